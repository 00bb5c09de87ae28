"""Where `bridge replay` copies callbacks to: another topic, a JSON Lines file, or an HTTP endpoint.

Each destination delivers one event at a time (the replay runs several at once) and raises
`DeliveryFailed`, saying whether trying again may help.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import IO, Protocol

import aiohttp
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from bridge import durable_files
from bridge.events import Event
from bridge.kafka_security import kafka_connection_options
from bridge.partitioner import partition_for
from bridge.settings import Settings
from bridge.topics import max_record_bytes

_HTTP_TIMEOUT_S = 10.0
_PRODUCE_TIMEOUT_S = 30.0


class DeliveryFailed(Exception):
    def __init__(self, reason: str, *, retriable: bool) -> None:
        super().__init__(reason)
        self.reason, self.retriable = reason, retriable


class Sink(Protocol):
    name: str

    async def open(self) -> None: ...

    async def deliver(self, event: Event) -> None: ...

    async def flush(self) -> None:
        """Make every delivered event durable (fsynced), before a checkpoint says it was copied."""
        ...

    async def close(self) -> None: ...


class FileSink:
    """Appends each envelope as one JSON line, to a file created 0600."""

    def __init__(self, path: str) -> None:
        self.name = path
        self._path = Path(path)
        self._file: IO[bytes] | None = None

    async def open(self) -> None:
        self._file = durable_files.open_append(self._path)

    async def deliver(self, event: Event) -> None:
        if self._file is None:
            raise DeliveryFailed(f"{self._path} is not open", retriable=False)
        try:
            self._file.write(event.json_line())
        except OSError as exc:
            raise DeliveryFailed(f"cannot write {self._path}: {exc}", retriable=True) from None

    async def flush(self) -> None:
        if self._file is not None:
            durable_files.sync(self._file)

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TopicSink:
    """Produces to a topic of the same cluster with acks=all: same key, timestamp and headers, and the
    partition the bridge would pick (the owning entity's, for the destination's partition count)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.name = topic
        self._topic = topic
        self._partitions = 0
        self._producer = AIOKafkaProducer(
            bootstrap_servers=list(settings.bootstrap_servers),
            client_id=settings.client_id,
            acks="all",
            enable_idempotence=False,  # broken on some brokers, and duplicates are handled by key
            compression_type=None if settings.compression == "none" else settings.compression,
            max_request_size=max_record_bytes(settings),
            **kafka_connection_options(settings),
        )

    async def open(self) -> None:
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()  # a producer that failed to start still holds its client
            raise
        try:
            partitions = await self._producer.partitions_for(self._topic)
        except KafkaError as exc:
            await self._producer.stop()
            raise DeliveryFailed(f"topic {self._topic!r} cannot be used: {exc}", retriable=False) from None
        self._partitions = len(partitions)

    async def deliver(self, event: Event) -> None:
        try:
            async with asyncio.timeout(_PRODUCE_TIMEOUT_S):
                await self._producer.send_and_wait(
                    self._topic,
                    event.value,
                    key=event.key.encode("utf-8"),
                    partition=partition_for(event.entity, self._partitions),
                    timestamp_ms=event.coordinates.timestamp,
                    headers=list(event.headers),
                )
        except TimeoutError:
            raise DeliveryFailed("the broker did not confirm the write", retriable=True) from None
        except KafkaError as exc:
            raise DeliveryFailed(f"the broker refused the write: {exc!r}", retriable=exc.retriable) from None

    async def flush(self) -> None:
        """Nothing to do: `deliver` returns once the broker has confirmed the write."""

    async def close(self) -> None:
        await self._producer.stop()


class UrlSink:
    """POSTs each callback body, as Tencent posted it, with the query stored in the envelope (without `Sign`,
    which the bridge never stores: a receiver that verifies signatures refuses these posts)."""

    def __init__(self, url: str) -> None:
        self.name = url
        self._url = url
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT_S))

    async def deliver(self, event: Event) -> None:
        if self._session is None:
            raise DeliveryFailed("the HTTP session is not open", retriable=False)
        try:
            async with self._session.post(
                self._url,
                params=event.query,
                data=event.raw_callback(),
                headers={"Content-Type": "application/json"},
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryFailed(f"POST {self._url}: {exc!r}", retriable=True) from None
        if status != 200:
            # A 4xx will be the same next time; a 5xx or 429 is the receiver's passing trouble.
            raise DeliveryFailed(f"POST {self._url}: HTTP {status}", retriable=status >= 500 or status == 429)

    async def flush(self) -> None:
        """Nothing to do: `deliver` returns once the receiver has answered 200."""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def sink_for(settings: Settings) -> Sink:
    if settings.to_topic is not None:
        return TopicSink(settings, settings.to_topic)
    if settings.to_file is not None:
        return FileSink(settings.to_file)
    if settings.to_url is not None:
        return UrlSink(settings.to_url)
    raise ValueError("no destination: give --to-topic, --to-file or --to-url")
