"""Reading a topic back as events, for analytics jobs, `bridge consume` and `bridge replay`.

An `EventReader` assigns the topic's partitions itself (only the partitions of the filter's entities, found
with the bridge's partitioner, when the filter names entities), finds where to start, decodes and filters
every record, and stops by itself when every partition has reached the end offset it had at start (or
`stop_offset`), unless it follows the topic. Event times say nothing about where a window ends in a
partition: a backfill writes old event times after newer ones, and a foreign record may carry any
timestamp. So "past the window's end" is judged by offsets only, and a window is read to that end.

Commits: with a `group`, an event is committed only once the job has finished it. By default an event is
finished when the job asks for the next one (a job that raises inside `async for` never commits the event
it failed on); with `manual_done=True` the job calls `done(event)`, in any order, and the committed offset
of a partition is its lowest event not yet done. A group's commit also never passes a partition's first
event at or after `until` (the window's end): the same group's next window starts there, not after it.
The events of this window read after that one are read again if this window is run again.

Forward mode's decision records (`bridge.readback.decisions`) share their callbacks' partitions: iterating
the reader (`events()`) passes over them, counted; `records()` yields them too, each with its callback.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from bridge.kafka.security import start_client
from bridge.readback.decisions import CallbackSeen, DecisionEvent, decode_decision
from bridge.readback.events import BadRecord, Event, EventFilter, InvalidEnvelope, coordinates_of
from bridge.readback.rejected import decode_any
from bridge.tencent.commands import runs_before
from bridge.tencent.envelope import CallbackId, is_decision_record
from bridge.tencent.partitioner import partition_for

log = logging.getLogger("bridge.consumer")  # see `bridge.logs.LOGGERS`

_POLL_MS = 250
_CALLBACKS_REMEMBERED = 100_000
"""How many before-callbacks `records()` remembers for the decisions that follow them: a decision is
written a few milliseconds after its callback, so it is read soon after it in the partition."""


class ReaderError(RuntimeError):
    """The topic cannot be read (it does not exist, the brokers do not answer)."""


@dataclass(slots=True)
class PartitionState:
    """How far one partition is read: `read_to` is the next offset to read, `end` the end seen at start,
    `held` the first offset left to a later window (an event at or after `until`)."""

    start: int
    end: int
    read_to: int
    outstanding: set[int] = field(default_factory=set)
    finished: bool = False
    committed: int | None = None
    held: int | None = None

    @property
    def committable(self) -> int:
        """The offset below which every record is handled for this window: what a checkpoint stores."""
        return min(self.outstanding) if self.outstanding else self.read_to

    @property
    def group_offset(self) -> int:
        """The offset a group commits: `committable`, but never past an event a later window wants."""
        return self.committable if self.held is None else min(self.committable, self.held)


@dataclass(slots=True)
class ReaderStats:
    events: int = 0
    filtered_out: int = 0
    bad: int = 0
    decisions: int = 0
    """Forward mode's records of an app server's decisions read: `events()` passes over them all (they
    are not callbacks); `records()` yields those its filter selects (`decisions_yielded`)."""
    decisions_yielded: int = 0


def log_bad_record(bad: BadRecord) -> None:
    log.warning("%s", bad)


class EventReader:
    """Async iteration over the events of a topic: `async with EventReader(...) as r: async for e in r`.

    `async for` (and `events()`) yields the callbacks alone, passing over forward mode's decision records
    (counted in `stats.decisions`); `records()` yields both, each decision as a `DecisionEvent` after its
    callback, in partition order."""

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topic: str,
        *,
        select: EventFilter | None = None,
        group: str | None = None,
        start: Literal["beginning", "end"] = "beginning",
        start_offsets: Mapping[int, int] | int | None = None,
        stop_offset: int | None = None,
        partitions: Iterable[int] | None = None,
        follow: bool = False,
        lateness_s: float = 3600.0,
        manual_done: bool = False,
        on_bad_record: Callable[[BadRecord], None] = log_bad_record,
        commit_interval_s: float = 5.0,
        before_commit: Callable[[], None] | None = None,
        client_id: str = "tencent-chat-kafka-bridge-reader",
        kafka_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`start_offsets` (per partition, or one offset for all) win over committed offsets, which win over
        `select.since_ms`, which wins over `start`. `stop_offset` ends every partition before that offset.
        `lateness_s` is how late (in event time) a callback may land after later ones in its partition: the
        `since` lookup starts that much earlier. `before_commit` runs before each commit of the group: a job
        that writes events out makes them durable there, so a commit is never ahead of its output."""
        servers = bootstrap_servers.split(",") if isinstance(bootstrap_servers, str) else bootstrap_servers
        self.topic = topic
        self.select = select or EventFilter()
        self.stats = ReaderStats()
        self._group, self._start, self._start_offsets = group, start, start_offsets
        self._stop_offset, self._follow, self._manual_done = stop_offset, follow, manual_done
        self._partitions = None if partitions is None else sorted(set(partitions))
        self._lateness_ms = int(lateness_s * 1000)
        self._on_bad_record, self._commit_interval_s = on_bad_record, commit_interval_s
        self._before_commit = before_commit
        self._servers, self._kafka_options = list(servers), dict(kafka_options or {})
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=list(servers),
            client_id=client_id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **dict(kafka_options or {}),
        )
        self._parts: dict[TopicPartition, PartitionState] = {}
        self._last_commit = time.monotonic()
        self._before_callbacks: OrderedDict[CallbackId, CallbackSeen] = OrderedDict()

    async def __aenter__(self) -> EventReader:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    @property
    def partitions(self) -> Mapping[int, PartitionState]:
        return {tp.partition: state for tp, state in self._parts.items()}

    def positions(self) -> dict[int, int]:
        """Per partition, the offset below which every record is handled: what a checkpoint stores."""
        return {tp.partition: state.committable for tp, state in self._parts.items()}

    def progress(self) -> float:
        """The share of the offsets between start and the end seen at start that has been read, 0 to 1."""
        total = sum(max(s.end - s.start, 0) for s in self._parts.values())
        read = sum(min(max(s.read_to - s.start, 0), max(s.end - s.start, 0)) for s in self._parts.values())
        finished = all(s.finished for s in self._parts.values())
        return 1.0 if finished or total == 0 else read / total

    async def start(self) -> None:
        try:
            await start_client(self._consumer, self._servers, self._kafka_options)
            await self._assign()
        except BaseException:
            await self._consumer.stop()
            raise

    async def close(self) -> None:
        """Commit what the job has finished (with a group), then leave."""
        try:
            await self.commit()
        except KafkaError as exc:
            log.warning("cannot commit the finished events of %s: %s", self.topic, exc)
        finally:
            await self._consumer.stop()

    def stop_reading(self) -> None:
        """End the iteration at the next record (Ctrl-C): what is not yet read stays unread."""
        for tp in self._parts:
            self._finish(tp)

    def done(self, event: Event | DecisionEvent) -> None:
        """With `manual_done`: the job has finished `event`, so its offset may be committed."""
        state = self._parts.get(TopicPartition(event.coordinates.topic, event.coordinates.partition))
        if state is not None:
            state.outstanding.discard(event.coordinates.offset)

    async def commit(self) -> None:
        """Commit, as the group, every partition's offset below which every event is done."""
        self._last_commit = time.monotonic()
        if self._group is None:
            return
        offsets = {
            tp: OffsetAndMetadata(state.group_offset, "")
            for tp, state in self._parts.items()
            if state.group_offset != state.committed
        }
        if offsets:
            if self._before_commit is not None:
                self._before_commit()
            await self._consumer.commit(offsets)
            for tp, meta in offsets.items():
                self._parts[tp].committed = meta.offset

    def events(self) -> AsyncGenerator[Event, None]:
        """The callbacks the filter selects; forward mode's decision records are passed over, counted."""
        return cast("AsyncGenerator[Event, None]", self._read(decisions=False))

    def records(self) -> AsyncGenerator[Event | DecisionEvent, None]:
        """The callbacks and forward mode's decision records the filter selects, in partition order.

        A decision goes with its callback: selected when the callback read before it was selected, whatever
        the filter says of the decision alone, so a job gets each callback of a window with its decisions.
        A decision whose callback was not read in this run (it started between the two) is judged by
        itself: its command (`decision-of`) and family, its `entity` header, and its receive time as its
        event time; one of an older bridge, without that header, has no entity, so a filter that names
        entities leaves it out."""
        return self._read(decisions=True)

    async def _read(self, *, decisions: bool) -> AsyncGenerator[Event | DecisionEvent, None]:
        """`records()`, or with `decisions` false `events()`: every decision record passed over, counted,
        and no callback remembered for one."""
        async for record in self._records():
            state = self._parts[TopicPartition(record.topic, record.partition)]
            state.read_to = record.offset + 1
            item: Event | DecisionEvent | None
            if is_decision_record(record.headers):
                self.stats.decisions += 1
                if not decisions:
                    continue
                item = self._decision(record, state)
                if item is not None:
                    self.stats.decisions_yielded += 1
            else:
                item = self._callback(record, state, remember=decisions)
                if item is not None:
                    self.stats.events += 1
            if item is not None:
                state.outstanding.add(record.offset)
                yield item
                if not self._manual_done:
                    state.outstanding.discard(record.offset)

    def _callback(
        self, record: ConsumerRecord[bytes, bytes], state: PartitionState, *, remember: bool = False
    ) -> Event | None:
        """The callback in `record` if the filter selects it; None (counted) if not, or if it is bad."""
        try:
            event = decode_any(record)  # a callback's envelope, or a dead-letter record
        except InvalidEnvelope as exc:
            self.stats.bad += 1
            self._on_bad_record(BadRecord(coordinates_of(record), str(exc)))
            return None
        selected = self.select.matches(event)
        if remember and runs_before(event.command):
            seen = CallbackSeen(event.entity, event.event_time_ms, event.coordinates, selected)
            self._before_callbacks[event.identity] = seen
            self._before_callbacks.move_to_end(event.identity)
            if len(self._before_callbacks) > _CALLBACKS_REMEMBERED:
                self._before_callbacks.popitem(last=False)
        if not selected:
            self._filtered_out(record, state, event.event_time_ms)
            return None
        return event

    def _decision(self, record: ConsumerRecord[bytes, bytes], state: PartitionState) -> DecisionEvent | None:
        """The decision in `record` if it goes with a selected callback (or, its callback unread, the filter
        selects it); None (counted) if not, or if it is bad."""
        try:
            decision = decode_decision(record)
        except InvalidEnvelope as exc:
            self.stats.bad += 1
            self._on_bad_record(BadRecord(coordinates_of(record), str(exc)))
            return None
        select = self.select
        seen = self._before_callbacks.get(decision.identity)
        if seen is not None:
            decision = decision.following(seen)
            selected = seen.selected
        else:
            selected = (
                (not select.commands or bool({decision.command, decision.family} & select.commands))
                and (not select.entities or decision.entity in select.entities)
                and select.in_window(decision.event_time_ms)
            )
        if not selected:
            self._filtered_out(record, state, decision.event_time_ms)
            return None
        return decision

    def _filtered_out(
        self, record: ConsumerRecord[bytes, bytes], state: PartitionState, event_time_ms: int
    ) -> None:
        self.stats.filtered_out += 1
        until = self.select.until_ms
        if state.held is None and until is not None and event_time_ms >= until:
            state.held = record.offset

    async def _records(self) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
        while active := [tp for tp, state in self._parts.items() if not state.finished]:
            batch = await self._consumer.getmany(*active, timeout_ms=_POLL_MS)
            for tp, records in batch.items():
                state = self._parts[tp]
                for record in records:
                    if state.finished:  # stop_reading() was called while this batch was read
                        break
                    if self._stop_offset is not None and record.offset >= self._stop_offset:
                        self._finish(tp)
                        break
                    yield record
            for tp in active:
                state = self._parts[tp]
                # Not `record.offset >= end`: the whole last batch is read, as some brokers (Tansu) report
                # the end offset of a multi-record batch as its base offset + 1.
                if not self._follow and state.read_to >= state.end:
                    self._finish(tp)
            if self._group is not None and time.monotonic() - self._last_commit >= self._commit_interval_s:
                await self.commit()

    def _finish(self, tp: TopicPartition) -> None:
        self._parts[tp].finished = True
        self._consumer.pause(tp)

    async def _assign(self) -> None:
        # Every topic's metadata, read from what the request returns: `consumer.topics()` throws it away, and
        # the client's own view holds no topic at all on Apache Kafka (aiokafka bootstraps asking for none).
        cluster = await self._consumer._client.fetch_all_metadata()
        available = cluster.partitions_for_topic(self.topic)
        if not available:
            raise ReaderError(f"topic {self.topic!r} does not exist (or has no partitions)")
        chosen = self._partitions
        if chosen is None and self.select.entities:
            chosen = sorted({partition_for(entity, len(available)) for entity in self.select.entities})
        tps = [TopicPartition(self.topic, p) for p in sorted(available) if chosen is None or p in chosen]
        self._consumer.assign(tps)
        beginnings = await self._consumer.beginning_offsets(tps)
        ends = await self._consumer.end_offsets(tps)
        starts = await self._start_positions(tps, beginnings, ends)
        for tp in tps:
            start = max(starts[tp], beginnings[tp])
            self._consumer.seek(tp, start)
            end = ends[tp] if self._stop_offset is None else min(ends[tp], self._stop_offset)
            self._parts[tp] = PartitionState(start=start, end=end, read_to=start, committed=None)
            if not self._follow and start >= end:
                self._finish(tp)

    async def _start_positions(
        self,
        tps: list[TopicPartition],
        beginnings: Mapping[TopicPartition, int],
        ends: Mapping[TopicPartition, int],
    ) -> dict[TopicPartition, int]:
        fallback = beginnings if self._start == "beginning" else ends
        starts = {tp: fallback[tp] for tp in tps}
        since = self.select.since_ms
        if since is not None:
            starts.update(await self._offsets_for_time(tps, since - self._lateness_ms, beginnings, ends))
        if self._group is not None:
            for tp in tps:
                committed = await self._consumer.committed(tp)
                if committed is not None and committed >= 0:
                    starts[tp] = committed
        for tp in tps:
            if isinstance(self._start_offsets, int):
                starts[tp] = self._start_offsets
            elif self._start_offsets is not None and tp.partition in self._start_offsets:
                starts[tp] = self._start_offsets[tp.partition]
        return starts

    async def _offsets_for_time(
        self,
        tps: list[TopicPartition],
        timestamp_ms: int,
        beginnings: Mapping[TopicPartition, int],
        ends: Mapping[TopicPartition, int],
    ) -> dict[TopicPartition, int]:
        """The first offset at or after `timestamp_ms` per partition; the beginning when the broker cannot
        say. An early answer is harmless (events are filtered by time here too), a late one would lose
        events: brokers that answer wrongly (Tansu) answer 0."""
        try:
            found = await self._consumer.offsets_for_times({tp: max(timestamp_ms, 0) for tp in tps})
        except (KafkaError, ValueError) as exc:
            log.info("the broker cannot look offsets up by time (%s); reading from the beginning", exc)
            return dict(beginnings)
        return {
            tp: ends[tp] if found.get(tp) is None else min(max(found[tp].offset, beginnings[tp]), ends[tp])
            for tp in tps
        }
