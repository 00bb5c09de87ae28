"""Tencent Cloud Chat webhooks to Apache Kafka, acknowledged only after the broker confirms."""

__version__ = "0.1.0"
