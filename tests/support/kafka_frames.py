"""Kafka protocol frames as the fault proxy (`tests/support/proxy.py`) reads and rewrites them.

A frame is a size-prefixed request or response. Produce and Metadata bodies are decoded and encoded with
aiokafka's own structs, for the versions aiokafka 0.14 sends: all non-flexible, so a request header is api
key, api version, correlation id and a nullable client id, and a response header is the correlation id.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from aiokafka.protocol import metadata, produce

PRODUCE_API_KEY, METADATA_API_KEY = 0, 3
PRODUCE_VERSIONS = range(9)
"""The Produce versions decoded here: aiokafka 0.14 sends 0-7, and has structs up to 8."""
METADATA_VERSIONS = range(6)
"""The Metadata versions decoded here: the ones aiokafka 0.14 sends."""
HEADER = struct.Struct(">hhi")  # api_key, api_version, correlation_id
LENGTH = struct.Struct(">i")
_INT16 = struct.Struct(">h")
_CLIENT_ID_AT = 4 + HEADER.size  # a request header's nullable client id follows (int16 length, -1: null)


class ProduceRequestFrame:
    """A Produce request as it came from the client: its header, and its body decoded."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        _, self.api_version, self.correlation_id = HEADER.unpack_from(frame, 4)
        (client_id_length,) = _INT16.unpack_from(frame, _CLIENT_ID_AT)
        self.header = frame[4 : _CLIENT_ID_AT + _INT16.size + max(client_id_length, 0)]
        self.body = getattr(produce, f"ProduceRequest_v{self.api_version}").decode(
            frame[4 + len(self.header) :]
        )
        self.required_acks: int = self.body.required_acks
        self.partition_count = sum(len(partitions) for _, partitions in self.body.topics)

    def refusal(self, error_code: int) -> bytes:
        """A ProduceResponse frame of the request's version giving every partition `error_code`."""
        response = getattr(produce, f"ProduceResponse_v{self.api_version}")
        version = self.api_version
        topics = [
            (topic, [partition_answer(version, partition, error_code) for partition, _ in partitions])
            for topic, partitions in self.body.topics
        ]
        fields: list[Any] = [topics] if version == 0 else [topics, 0]  # throttle_time_ms from v1
        body = LENGTH.pack(self.correlation_id) + bytes(response(*fields).encode())
        return LENGTH.pack(len(body)) + body

    def without_last_partition(self) -> tuple[bytes, tuple[str, int]]:
        """The request's frame without the last partition of its last topic, and that partition."""
        *others, (topic, partitions) = self.body.topics
        removed = (topic, partitions[-1][0])
        if len(partitions) > 1:
            others.append((topic, partitions[:-1]))
        rest = type(self.body)(**{name: self.body.get_item(name) for name in self.body.SCHEMA.names})
        rest.topics = others
        body = self.header + bytes(rest.encode())
        return LENGTH.pack(len(body)) + body, removed


def partition_answer(api_version: int, partition: int, error_code: int) -> tuple[Any, ...]:
    """A partition's entry in a ProduceResponse of `api_version`: no offset, no timestamp, no log start
    offset, no record errors, no error message, as far as the version has those fields."""
    full: tuple[Any, ...] = (partition, error_code, -1, -1, -1, [], None)
    if api_version < 2:
        return full[:3]
    if api_version < 5:
        return full[:4]
    if api_version < 8:
        return full[:5]
    return full


def with_produce_error(frame: bytes, api_version: int, error_code: int) -> bytes:
    """The broker's Produce answer with `error_code` for every partition, the rest kept."""
    response = getattr(produce, f"ProduceResponse_v{api_version}").decode(frame[8:])
    response.topics = [
        (topic, [(partition[0], error_code, *partition[2:]) for partition in partitions])
        for topic, partitions in response.topics
    ]
    return _response_frame(frame, response)


def with_partition_answer(frame: bytes, api_version: int, topic: str, partition: int, code: int) -> bytes:
    """The broker's Produce answer with an entry for `partition` of `topic` giving `code`."""
    response = getattr(produce, f"ProduceResponse_v{api_version}").decode(frame[8:])
    entry = partition_answer(api_version, partition, code)
    topics = [(name, list(partitions)) for name, partitions in response.topics]
    for name, partitions in topics:
        if name == topic:
            partitions.append(entry)
            break
    else:
        topics.append((topic, [entry]))
    response.topics = topics
    return _response_frame(frame, response)


def with_brokers_at(frame: bytes, api_version: int, host: str, port: int) -> bytes:
    """The broker's Metadata answer with every broker at `host`:`port`."""
    response = getattr(metadata, f"MetadataResponse_v{api_version}").decode(frame[8:])
    response.brokers = [(broker[0], host, port, *broker[3:]) for broker in response.brokers]
    return _response_frame(frame, response)


def _response_frame(frame: bytes, response: Any) -> bytes:
    """`frame`'s header (a non-flexible response's: the correlation id) with `response` as its body."""
    body = frame[4:8] + bytes(response.encode())
    return LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    size = await reader.readexactly(4)
    return size + await reader.readexactly(LENGTH.unpack(size)[0])
