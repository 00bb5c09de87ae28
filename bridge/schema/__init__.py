"""Typed schemas of the bridge's records, generated from the command registry (`bridge.tencent.commands`).

`model` reads the registry into typed fields for a command, a family or a topic; `json_schema`,
`clickhouse`, `flink` and `spark` turn one selection into a JSON Schema, ClickHouse DDL and column
extraction, a Flink SQL table and a Spark `StructType` (as JSON); `command` is `bridge schema`, which prints
any of them; `shipped` writes the copies shipped in the package (`bridge/schema/generated/`).
"""
