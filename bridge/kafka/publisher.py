"""The publisher: writes confirmed with acks=all under the callback's deadline, and whether Kafka is ready.

`KafkaPublisher.publish(record, deadline)` is the write: it picks the record's partition (its entity's, in
the topic's partition count at start), refuses a record its topic would refuse, and hands it to the batches
of the producer that `bridge.kafka.producer` keeps connected, answering once the broker confirmed it or the
deadline (one instant on the event loop's clock) passed. "Not ready" is raised here, and only here.

`start()` returns at once and the supervisor connects in the background, so the bridge serves `/healthz`
and answers callbacks with 503 while the brokers are unreachable or its topics are missing; it becomes
ready by itself.

Readiness also needs every topic as it was at start: present, with the partition count read when the bridge
first became ready (`partition_for` maps entities with it, so a changed count would remap accounts). The probe
checks that every second from metadata of every topic; a topic gone or changed makes the bridge not ready, its
callbacks get 503 "not written", and the log says why. The bridge never asks for a topic's metadata by name
(see `bridge.kafka.batching`): a broker with `auto.create.topics.enable` creates a topic so asked for, which
after a deletion would bring it back with the broker's default partition count.

At each connection the topics' `max.message.bytes` is read (DescribeConfigs): a record larger than its
topic takes is answered 413 before it is sent, rather than refused by the broker after the hand-over.

Readiness also needs enough replicas in sync: a partition whose in-sync replicas, in the metadata the probe
reads every second, are fewer than its topic's `min.insync.replicas` (read with `max.message.bytes`) has a
leader that refuses acks=all writes (NOT_ENOUGH_REPLICAS). The bridge is then not ready, and `/readyz` names
the partitions and the broker's last refusal; it is ready again once the metadata shows the replicas back in
sync, whether or not a callback came meanwhile (a load balancer may have sent none to a bridge not ready).
aiokafka retries such a refusal until the batch's deadline, so the bridge learns the broker's error only when
a batch fails with it.

What becomes of the records is told to a `DeliveryListener` (the ingest side's metrics and outcomes): records
queued and settled, the broker's refusals, the partitions short of replicas, and how the ambiguous records
(answered 503 while they may still land) ended."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import BrokerResponseError, KafkaConnectionError, KafkaError, RequestTimedOutError

from bridge.errors import BrokerNotReady, BrokerRejected, DeliveryTimeout, describe
from bridge.kafka.batching import Expired, NotHandedOver, Partition, PartitionBatches
from bridge.kafka.producer import ProducerSupervisor, ProducerWatch, stop_producer
from bridge.kafka.readiness import InSyncReplicas, TopicsAtStart, isr_problems
from bridge.kafka.sizes import BATCH_BYTES, check_record_size, record_bytes
from bridge.secret import Secret
from bridge.settings import ServeSettings
from bridge.tencent.envelope import Record
from bridge.tencent.partitioner import partition_for

log = logging.getLogger("bridge.publisher")  # see `bridge.logs.LOGGERS`

EXPIRY_TICK_S = 0.01
"""The width of a bucket of deadlines (see `_Expiries`): a record expires at most this early, never late:
the producer's own timeout, at the deadline, must not come first (its error would read as a refusal)."""


class Publisher(Protocol):
    """What the HTTP layer needs from Kafka; tests may substitute a fake."""

    @property
    def ready(self) -> bool: ...

    @property
    def status(self) -> str:
        """Why the publisher is or is not ready, in words."""
        ...

    @property
    def abandoned(self) -> int:
        """Records answered 503 that the producer still holds: they count against the in-flight limit."""
        ...

    async def publish(self, record: Record, deadline: float) -> None:
        """Return once the broker has confirmed the record with acks=all, by `deadline` (the event loop's
        clock); raise `PublishError` otherwise, or `RecordTooLarge` for a record its topic would refuse."""
        ...


class DeliveryListener(Protocol):
    """Told what becomes of the records, as the producer settles them."""

    def records_queued(self, records: int) -> None:
        """`records` handed to the producer (> 0), or settled by it, whatever the answer (< 0)."""

    def broker_refused(self, error: str, records: int) -> None:
        """`records` in a batch the broker refused with the Kafka error `error` (a class name)."""

    def partitions_below_min_isr(self, counts: Mapping[str, int]) -> None:
        """Each topic's count of partitions with fewer replicas in sync than its `min.insync.replicas`."""

    def ambiguous_ended(self, landed: bool) -> None:
        """A record answered 503 that might still land has ended: it landed, or it was given up."""


class _Unheard:
    """The listener of a publisher nobody listens to."""

    def records_queued(self, records: int) -> None:
        pass

    def broker_refused(self, error: str, records: int) -> None:
        pass

    def partitions_below_min_isr(self, counts: Mapping[str, int]) -> None:
        pass

    def ambiguous_ended(self, landed: bool) -> None:
        pass


class _Expiries:
    """The deadlines of the records being awaited, in buckets of `EXPIRY_TICK_S`, one event-loop timer per
    bucket. A `call_at` and a `cancel` per callback cost 1.9 us alone and leave a cancelled timer on the
    loop's heap (whose order is Python code) until its time comes; a dict entry costs a tenth of that. A
    bucket's timer expires what is still in it; a record settled before leaves its bucket."""

    __slots__ = ("_buckets", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._buckets: dict[float, dict[asyncio.Future[None], PartitionBatches]] = {}

    def add(
        self, deadline: float, delivery: asyncio.Future[None], batches: PartitionBatches
    ) -> dict[asyncio.Future[None], PartitionBatches]:
        """Expire `delivery` of `batches` at `deadline` unless it leaves the bucket returned before."""
        key = deadline // EXPIRY_TICK_S  # the bucket starting at or before the deadline (a whole float)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            self.loop.call_at(key * EXPIRY_TICK_S, self._expire, key)
        bucket[delivery] = batches
        return bucket

    def _expire(self, key: float) -> None:
        for delivery, batches in self._buckets.pop(key).items():
            batches.expire(delivery)


class KafkaPublisher:
    def __init__(
        self,
        settings: ServeSettings,
        listener: DeliveryListener | None = None,
        *,
        watch: ProducerWatch | None = None,
    ) -> None:
        """`listener` is told what becomes of the records; `watch` waits for a producer's death (see
        `bridge.kafka.producer.wait_for_death`, which a test may replace)."""
        self._settings = settings
        self._listener: DeliveryListener = _Unheard() if listener is None else listener
        # Built once, here: a bad TLS file or a SASL setting missing fails the start, not every reconnect.
        self._supervisor = ProducerSupervisor(settings, settings.client_options(), self, watch)
        self._producer: AIOKafkaProducer | None = None
        self._batches: PartitionBatches | None = None
        self._start_partitions: Mapping[str, int] = {}
        """Each topic's partition count when the bridge first became ready: the one `partition_for` uses."""
        self._topics = TopicsAtStart(settings)
        self._max_record_bytes = settings.max_record_bytes  # read once: `publish` is on every callback's path
        self._compressed = settings.compression != "none"
        self._isr = InSyncReplicas(settings.topics, self._listener.partitions_below_min_isr)
        self._refusals: dict[Partition, str] = {}
        """The broker's error for the last batch of a partition it refused, until one of its batches is
        confirmed."""
        self._abandoned = 0
        self._expiries: _Expiries | None = None
        """Made on the first write: on the event loop the publisher writes on."""

    @property
    def ready(self) -> bool:
        producer = self._producer
        return (
            producer is not None
            and self._supervisor.answering
            and not self._topics.problems
            and not self._isr.below
            and bool(producer.client.cluster.brokers())
        )

    def use_sasl_password(self, password: Secret) -> None:
        """Log in to Kafka with `password` from now on (`ProducerSupervisor.use_sasl_password`)."""
        self._supervisor.use_sasl_password(password)

    @property
    def abandoned(self) -> int:
        return self._abandoned

    @property
    def status(self) -> str:
        if self.ready:
            return "ready"
        problems = self._topics.problems or self._isr.below
        if self._producer is not None and self._supervisor.answering and problems:
            return "; ".join(
                [*self._topics.problems.values(), *isr_problems(self._isr.below, self._refusals)]
            )
        return self._supervisor.status

    @property
    def producer(self) -> AIOKafkaProducer | None:
        """The producer written with now; None while there is none (tests kill it to see it rebuilt)."""
        return self._producer

    @property
    def partitions_at_start(self) -> Mapping[str, int]:
        """Each topic's partition count when the bridge first became ready; empty until it did."""
        return self._start_partitions

    async def start(self) -> None:
        self._supervisor.start()

    async def close(self) -> None:
        """Stop connecting, then flush and close the producer within the shutdown timeout."""
        await self._supervisor.close()
        producer, batches = self._producer, self._batches
        self._producer, self._batches = None, None
        if producer is None or batches is None:
            return
        # Half the shutdown timeout at most to hand over what is queued, so the producer has time to stop.
        try:
            async with asyncio.timeout(self._settings.shutdown_timeout / 2):
                await batches.flush()
        except TimeoutError:
            pass  # what was not handed over is given up below, and the producer stopped all the same
        await self.retire(
            producer, batches, "the bridge is shutting down", self._settings.shutdown_timeout / 2
        )

    async def publish(self, record: Record, deadline: float) -> None:
        batches = self._batches
        partitions = None
        if batches is not None and record.topic not in self._topics.problems:
            partitions = self._start_partitions.get(record.topic)
        if batches is None or partitions is None:
            raise BrokerNotReady(f"Kafka is not ready ({self.status}); the callback was not written")
        expiries = self._expiries
        if expiries is None:
            expiries = self._expiries = _Expiries(asyncio.get_running_loop())
        loop = expiries.loop
        timeout = deadline - loop.time()
        if timeout <= 0:
            raise DeliveryTimeout(
                "no time was left to write the callback; it was not written", ambiguous=False
            )
        # The size check's common case written out (`check_record_size` has the rest): a record's bound, once
        # computed, within its topic's limit.
        limits = self._supervisor.record_limits
        size = record_bytes(record)  # kept on the record: a topic of small batches asks again
        if self._compressed or size > (
            limits.get(record.topic, self._max_record_bytes) if limits else self._max_record_bytes
        ):
            check_record_size(record, limits, self._max_record_bytes, self._settings.compression)
        number = self.partition_of(record, partitions)
        try:
            delivery = batches.add(record, number)
        except NotHandedOver as exc:
            raise _not_written(exc) from None
        expiring = expiries.add(deadline, delivery, batches)
        try:
            await delivery
        except Expired as exc:
            # The record stays queued: it may still be written after this answer, and is followed.
            partition = (record.topic, number)
            known = self._isr.below.get(partition) or self._refusals.get(partition)
            why = "" if known is None else f" ({known})"
            raise DeliveryTimeout(
                f"Kafka did not confirm the write within {timeout:.3g} s{why}; the callback is not "
                "acknowledged",
                ambiguous=True,
                fate=exc.fate,
            ) from None
        except NotHandedOver as exc:
            raise _not_written(exc) from None
        except KafkaError as exc:
            # A batch handed to the producer may have been appended by an attempt whose answer was lost;
            # aiokafka retries and reports only the last attempt's error. So: ambiguous, and given up.
            self._listener.ambiguous_ended(False)
            given_up = loop.create_future()
            given_up.set_result(False)
            raise BrokerRejected(
                f"Kafka refused the write: {describe(exc)}", ambiguous=True, fate=given_up
            ) from None
        except asyncio.CancelledError:
            batches.abandon(delivery)  # the handler was cancelled (at shutdown): follow the record still
            raise
        finally:
            expiring.pop(delivery, None)

    def partition_of(self, record: Record, partitions: int) -> int:
        """The partition of `record` in its topic of `partitions`: its owning entity's."""
        return partition_for(record.entity, partitions)

    # --- the producer's user (`bridge.kafka.producer.ProducerUser`) -------------------------------------

    def connected(self, producer: AIOKafkaProducer) -> PartitionBatches:
        cluster = producer.client.cluster
        if not self._start_partitions:
            self._start_partitions = {t: len(cluster.partitions_for_topic(t)) for t in self._settings.topics}
        batches = self.batches_for(producer)
        self._check_metadata(cluster)  # a producer rebuilt later may find a topic changed
        cluster.add_listener(self._metadata_changed)
        self._producer = producer
        self.serve(batches, self._start_partitions)
        return batches

    def metadata_read(self, cluster: ClusterMetadata) -> None:
        self._check_metadata(cluster)

    def disconnected(self) -> None:
        self._producer, self._batches = None, None

    async def retire(
        self, producer: AIOKafkaProducer, batches: PartitionBatches, reason: str, timeout: float
    ) -> None:
        """Stop `producer` and settle every record it and `batches` still hold."""
        producer.client.cluster.remove_listener(self._metadata_changed)
        batches.close(KafkaConnectionError(reason))
        try:
            await stop_producer(producer, timeout)
        finally:  # even when the stop is cancelled or fails: else their in-flight slots stay taken for good
            batches.abort_in_producer(reason)

    # --- seams: what `connected` does with a real producer, for tests that fake one ---------------------

    def batches_for(self, producer: AIOKafkaProducer) -> PartitionBatches:
        """The batches to write through with `producer`, reporting to this publisher and its listener."""
        return PartitionBatches(
            producer,
            self._abandoned_changed,
            self._listener.records_queued,
            batch_limits={t: n for t, n in self._supervisor.record_limits.items() if n < BATCH_BYTES},
            on_settled=self._batch_settled,
        )

    def serve(self, batches: PartitionBatches, partitions: Mapping[str, int]) -> None:
        """Write through `batches` from now on, with `partitions` as each topic's count at start."""
        self._batches, self._start_partitions = batches, partitions

    # --- readiness ------------------------------------------------------------------------------------

    def _metadata_changed(self, cluster: ClusterMetadata) -> None:
        """The producer's metadata changed (every topic's, as it never names one): look at the topics."""
        self._check_metadata(cluster)
        if self._batches is not None:
            self._batches.metadata_changed()

    def _check_metadata(self, cluster: ClusterMetadata) -> None:
        """What a read of the metadata says of readiness: the topics as at start, enough replicas in sync."""
        self._topics.check(cluster, self._start_partitions)
        self._isr.check(cluster, self._supervisor.min_insync)

    def _batch_settled(self, partition: Partition, records: int, error: BaseException | None) -> None:
        """A batch of `partition` was confirmed (`error` None) or failed: note what the broker said."""
        if error is None:
            self._refusals.pop(partition, None)
            return
        if not isinstance(error, BrokerResponseError):
            return  # not the broker's answer: a lost connection, the producer stopping
        if isinstance(error, RequestTimedOutError) and isinstance(error.__cause__, TimeoutError):
            # aiokafka's own request timeout, raised as the broker's REQUEST_TIMED_OUT (`client.send`): the
            # broker said nothing, it refused nothing.
            return
        refusal = f"{error.message} ({type(error).__name__})"
        if self._refusals.get(partition) != refusal:
            log.warning(
                "the broker refused a batch of topic %s partition %d: %s", *partition, describe(error)
            )
        self._refusals[partition] = refusal
        self._listener.broker_refused(type(error).__name__, records)

    def _abandoned_changed(self, landed: bool | None) -> None:
        """A record answered 503 counts against the in-flight limit until the producer settles it."""
        if landed is None:
            self._abandoned += 1
            return
        self._abandoned -= 1
        self._listener.ambiguous_ended(landed)


def _not_written(exc: NotHandedOver) -> BrokerNotReady:
    return BrokerNotReady(
        f"Kafka did not take the write ({describe(exc.cause)}); the callback was not written"
    )
