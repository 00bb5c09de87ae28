"""A real Apache Kafka for the tests: the broker's jars from Maven Central, run as local KRaft nodes.

`jars` resolves and caches the jars, `nodes` runs one combined node or a three-node cluster, `view` reads
the cluster's own view of partitions, leaders and in-sync replicas.
"""
