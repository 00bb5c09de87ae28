"""Where `bridge replay` copies callbacks to: another topic, a JSON Lines file, or an HTTP endpoint.

Each destination delivers one event at a time (the replay runs several at once) and raises
`DeliveryFailed`, saying what the failure means (`Failure`): it may pass, so try again; this record is
refused for good, so set it aside; or the destination refuses every record, so stop. Only a refusal that
names the record itself sets it aside: a wrong URL, token or permission would otherwise consume the whole
window, each record "failed for good" and the checkpoint moved past it.
"""

from __future__ import annotations

import asyncio
from enum import Enum
from pathlib import Path
from typing import IO, Protocol

import aiohttp
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from yarl import URL

from bridge.kafka.security import start_client
from bridge.readback import durable_files
from bridge.readback.decisions import DecisionEvent
from bridge.readback.events import Event
from bridge.settings import ReplaySettings
from bridge.tencent.partitioner import partition_for

_HTTP_TIMEOUT_S = 10.0
_PRODUCE_TIMEOUT_S = 30.0


# HTTP answers about the record itself: malformed, too large, failing the receiver's checks.
_RECORD_REFUSED_STATUSES = frozenset({400, 413, 422})
# The receiver's passing trouble, worth trying again.
_PASSING_STATUSES = frozenset({408, 429})
# Broker errors about the record itself; any other error that is not retriable (an authorization failure,
# a topic that cannot be used, an unsupported version) would refuse every record.
_RECORD_REFUSED_ERRORS = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    CorruptRecordException,
    InvalidTimestampError,
)


class Failure(Enum):
    """What a failed delivery means for the replay."""

    PASSING = "passing"
    """It may pass: try again, after a backoff (a network error, a timeout, a 5xx, a retriable error)."""
    RECORD = "record"
    """This record is refused for good: set it aside in the skipped file and go on."""
    DESTINATION = "destination"
    """The destination would refuse every record (a redirect, 401, 403, 404, 405, an authorization
    failure): stop, with the checkpoint before this record."""


class DeliveryFailed(Exception):
    def __init__(self, reason: str, failure: Failure) -> None:
        super().__init__(reason)
        self.reason, self.failure = reason, failure


def http_failure(status: int) -> Failure | None:
    """What an HTTP answer means; None for a 2xx, the receiver's acceptance. Redirects are not followed
    (a 302 would become a GET whose 200 says nothing of the record), so a 3xx stops the replay too."""
    if 200 <= status < 300:
        return None
    if status >= 500 or status in _PASSING_STATUSES:
        return Failure.PASSING
    if status in _RECORD_REFUSED_STATUSES:
        return Failure.RECORD
    return Failure.DESTINATION


def kafka_failure(exc: KafkaError) -> Failure:
    if exc.retriable:
        return Failure.PASSING
    if isinstance(exc, _RECORD_REFUSED_ERRORS):
        return Failure.RECORD
    return Failure.DESTINATION


class Sink(Protocol):
    name: str

    async def open(self) -> None: ...

    async def deliver(self, event: Event | DecisionEvent) -> None:
        """Deliver one callback, or (copied by `--to-topic` and `--to-file` only) one decision record."""
        ...

    async def flush(self) -> None:
        """Make every delivered event durable (fsynced), before a checkpoint says it was copied."""
        ...

    async def close(self) -> None: ...


class FileSink:
    """Appends each envelope as one JSON line (`Event.json_line`: a `cloudevents` record as its
    envelope), to a file created 0600."""

    def __init__(self, path: str) -> None:
        self.name = path
        self._path = Path(path)
        self._file: IO[bytes] | None = None

    async def open(self) -> None:
        self._file = durable_files.open_append(self._path)

    async def deliver(self, event: Event | DecisionEvent) -> None:
        if self._file is None:
            raise DeliveryFailed(f"{self._path} is not open", Failure.DESTINATION)
        try:
            self._file.write(event.json_line())
        except OSError as exc:
            raise DeliveryFailed(f"cannot write {self._path}: {exc}", Failure.PASSING) from None

    async def flush(self) -> None:
        if self._file is not None:
            durable_files.sync(self._file)

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TopicSink:
    """Produces to a topic of the same cluster with acks=all: same value, key, timestamp and headers (so
    the record format of each record is kept), and the partition the bridge would pick (the owning
    entity's, for the destination's partition count). A decision record goes to its callback's partition:
    its entity's, from its `entity` header or the callback read before it; a decision of an older bridge
    (no header) read without its callback goes to the partition it was read from, when the two topics have
    as many partitions, else it is set aside.

    Compression and the largest record are replay's own `--compression` and `--max-record-bytes`; the
    producer is a `producer_class` (aiokafka's, unless a test stands in for the broker's answers).
    """

    def __init__(
        self,
        settings: ReplaySettings,
        topic: str,
        *,
        producer_class: type[AIOKafkaProducer] = AIOKafkaProducer,
    ) -> None:
        self.name = topic
        self._topic, self._source_topic = topic, settings.topic
        self._partitions = 0
        self._source_partitions: int | None = None
        self._servers, self._kafka_options = settings.bootstrap_servers, settings.client_options()
        self._producer = producer_class(
            bootstrap_servers=list(settings.bootstrap_servers),
            client_id=settings.client_id,
            acks="all",
            enable_idempotence=False,  # broken on some brokers, and duplicates are handled by key
            compression_type=None if settings.compression == "none" else settings.compression,
            max_request_size=settings.max_record_bytes,
            **self._kafka_options,
        )

    async def open(self) -> None:
        try:
            await start_client(self._producer, self._servers, self._kafka_options)
        except BaseException:
            await self._producer.stop()  # a producer that failed to start still holds its client
            raise
        try:
            partitions = await self._producer.partitions_for(self._topic)
        except KafkaError as exc:
            await self._producer.stop()
            reason = f"topic {self._topic!r} cannot be used: {exc}"
            raise DeliveryFailed(reason, Failure.DESTINATION) from None
        self._partitions = len(partitions)

    async def deliver(self, event: Event | DecisionEvent) -> None:
        if isinstance(event, DecisionEvent):
            key, partition = event.record_key, await self._decision_partition(event)
        else:
            key, partition = event.key.encode("utf-8"), partition_for(event.entity, self._partitions)
        try:
            async with asyncio.timeout(_PRODUCE_TIMEOUT_S):
                await self._producer.send_and_wait(
                    self._topic,
                    event.value,
                    key=key,
                    partition=partition,
                    timestamp_ms=event.coordinates.timestamp,
                    headers=list(event.headers),
                )
        except TimeoutError:
            raise DeliveryFailed("the broker did not confirm the write", Failure.PASSING) from None
        except KafkaError as exc:
            raise DeliveryFailed(f"the broker refused the write: {exc!r}", kafka_failure(exc)) from None

    async def flush(self) -> None:
        """Nothing to do: `deliver` returns once the broker has confirmed the write."""

    async def close(self) -> None:
        await self._producer.stop()

    async def _decision_partition(self, decision: DecisionEvent) -> int:
        if decision.entity is not None:
            return partition_for(decision.entity, self._partitions)
        if self._source_partitions is None:  # asked once, and only for a decision read without its callback
            try:
                self._source_partitions = len(await self._producer.partitions_for(self._source_topic))
            except KafkaError as exc:
                raise DeliveryFailed(
                    f"the partitions of {self._source_topic!r}: {exc!r}", Failure.PASSING
                ) from None
        if self._source_partitions == self._partitions:
            return decision.coordinates.partition
        raise DeliveryFailed(
            f"a decision read without its callback (read before the replay's start), so of no known entity: "
            f"{self._source_topic!r} has {self._source_partitions} partitions and {self._topic!r} "
            f"{self._partitions}, so its callback's partition there is unknown",
            Failure.RECORD,
        )


class UrlSink:
    """POSTs each callback body, as Tencent posted it, with the query stored in the record (the envelope's
    `query`, or a `cloudevents` record's `ce_query`), without `Sign`, which the bridge never stores: a
    receiver that verifies signatures refuses these posts. Redirects are not followed; messages show the
    URL without its password."""

    def __init__(self, url: str) -> None:
        self._url = url
        parsed = URL(url)
        self.name = str(parsed.with_password("********")) if parsed.password else url
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT_S))

    async def deliver(self, event: Event | DecisionEvent) -> None:
        if isinstance(event, DecisionEvent):  # never reached: the replay never hands one to a URL
            raise DeliveryFailed("a decision record is not a callback: it is never posted", Failure.RECORD)
        if self._session is None:
            raise DeliveryFailed("the HTTP session is not open", Failure.DESTINATION)
        try:
            async with self._session.post(
                self._url,
                params=event.query,
                data=event.raw_callback(),
                headers={"Content-Type": "application/json"},
                allow_redirects=False,
            ) as response:
                await response.read()
                status = response.status
                location = response.headers.get("Location")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryFailed(f"POST {self.name}: {exc!r}", Failure.PASSING) from None
        failure = http_failure(status)
        if failure is not None:
            reason = f"POST {self.name}: HTTP {status}"
            if 300 <= status < 400:
                reason += f" to {location or '(no Location)'}; redirects are not followed"
            raise DeliveryFailed(reason, failure)

    async def flush(self) -> None:
        """Nothing to do: `deliver` returns once the receiver has answered 2xx."""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def sink_for(settings: ReplaySettings) -> Sink:
    if settings.to_topic is not None:
        return TopicSink(settings, settings.to_topic)
    if settings.to_file is not None:
        return FileSink(settings.to_file)
    if settings.to_url is not None:
        return UrlSink(settings.to_url)
    raise ValueError("no destination: give --to-topic, --to-file or --to-url")
