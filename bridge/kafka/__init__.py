"""Kafka: the publisher the ingest path writes through, its batching, producer supervision, the topics and
the connection options (TLS, SASL) every client of the bridge shares."""
