"""What the tests share, one module per subject; `tests/conftest.py` holds thin fixtures over them.

- `broker`: which broker the session runs on, starting it, and the brokers fault tests start themselves
- `kafka/`: the local Apache Kafka (KRaft nodes and clusters from Maven Central's jars, a secured node)
- `proxy`, `kafka_frames`: the Kafka-aware fault proxy and the protocol frames it rewrites
- `compose`: docker-compose.yml run as local processes
- `settings`: settings with topics of the test's own, or no broker at all
- `requests`: the Tencent callbacks of `tests/fixtures/`
- `fakes`: the fake publisher of the unit tier
- `serve`: the bridge under test, in process or as `bridge` subprocesses, and waiting until it is ready
- `records`: reading and counting what Kafka holds, making topics
- `readback`: the read side's three days of callbacks and the receiver of `replay --to-url`
"""
