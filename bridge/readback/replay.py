"""`bridge replay`: copy the callbacks of a window (event time) or an offset range to a destination.

The reader (`consumer.EventReader`) finds the start, filters by event time on this side too and stops by
itself; deliveries run `--concurrency` at a time, under `--rate`, each retried `--retries` times when the
failure may pass (`sinks.Failure`). A record the destination refuses for good (HTTP 400, 413, 422, a
record too large for the topic) is reported with its coordinates, counted as an error and set aside in the
`--skipped` file, to be re-sent once fixed. A refusal that would hit every record (a redirect, 401, 403,
404, 405, an authorization failure), or a delivery still failing after its retries, stops the replay with
the checkpoint before that record.

`--checkpoint FILE` holds, per partition, the offset below which every record is handled (copied, dropped
as a duplicate, filtered out, reported or set aside). It is written every second and at the end, after the
destination and the skipped file have confirmed or fsynced what it covers (`durable_files`), so a replay
stopped with Ctrl-C and run again copies every record once. After a crash, records copied since the last
write are copied again. The checkpoint names the replay it belongs to (topic, window, offsets, filters,
destination): a different replay refuses it rather than skip what it never copied.

Forward mode's decision records (`--decisions`): `auto` copies them to `--to-topic` (a copy of the topic
as the bridge wrote it, which analytics jobs join with the callbacks) and passes over them for `--to-file`
(consume's callback lines) and `--to-url` (a decision is not a callback: it is never posted). Deliveries
start in the order records are read; a decision's waits until its callback's delivery has ended, landed
(or set aside), so it lands after its callback even when that is tried again, and a record read after the
decision may land before it (as in the source topic, where the bridge writes a decision once the app
answered, other callbacks of the entity may come between the two). `--dedup` drops callbacks only: each
decision is one answer of the app server.

Before reading anything, the destination file, the skipped file and the checkpoint are checked to be
writable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import orjson
from aiokafka.errors import KafkaError

from bridge.errors import CommandError, ExitStatus
from bridge.process import kafka_failed, run_loop, stop_signals
from bridge.readback import durable_files
from bridge.readback.decisions import DecisionEvent
from bridge.readback.events import BadRecord, Deduplicator, Event, EventFilter
from bridge.readback.progress import Progress, Tally
from bridge.readback.reader import EventReader, ReaderError
from bridge.readback.sinks import DeliveryFailed, Failure, Sink, sink_for
from bridge.settings import ReaderSettings, ReplaySettings
from bridge.tencent.commands import runs_before
from bridge.tencent.envelope import CallbackId

_CHECKPOINT_EVERY_S = 1.0
_RETRY_FIRST_S, _RETRY_MAX_S = 0.2, 5.0


class ReplayError(RuntimeError):
    """The replay cannot start or cannot go on; the message says why."""


def copies_decisions(settings: ReplaySettings) -> bool:
    """Whether this replay copies forward mode's decision records: `--decisions include`, or `auto` for a
    `--to-topic`."""
    if settings.decisions == "auto":
        return settings.to_topic is not None
    return settings.decisions == "include"


def replay_identity(settings: ReplaySettings) -> dict[str, Any]:
    """What makes two runs the same replay: a checkpoint is only valid for the replay that wrote it. A
    replay that copies decisions says so; one that does not is named as before decisions were copied, so
    its older checkpoints stay valid."""
    if settings.to_file is not None:
        destination = f"file:{os.path.abspath(settings.to_file)}"
    elif settings.to_topic is not None:
        destination = f"topic:{settings.to_topic}"
    else:
        destination = f"url:{settings.to_url}"
    decisions = {"decisions": "include"} if copies_decisions(settings) else {}
    return {
        "topic": settings.topic,
        "since": settings.since,
        "until": settings.until,
        "from_offset": settings.from_offset,
        "to_offset": settings.to_offset,
        "command": sorted(settings.command),
        "account": settings.account,
        "destination": destination,
        **decisions,
    }


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Per-partition progress of one replay (`replay_identity`), in a JSON file (0600) replaced atomically
    and durably."""

    path: Path
    replay: Mapping[str, Any]

    def load(self) -> dict[int, int]:
        if not self.path.exists():
            return {}
        try:
            data = orjson.loads(self.path.read_bytes())
            replay, positions = data["replay"], data["positions"]
            loaded = {int(partition): int(offset) for partition, offset in positions.items()}
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ReplayError(f"checkpoint {self.path} cannot be read: {exc!r}") from None
        if replay != self.replay:
            names = sorted(k for k in {*replay, *self.replay} if replay.get(k) != self.replay.get(k))
            raise ReplayError(
                f"checkpoint {self.path} is for another replay (its {', '.join(names)} differ); "
                "give the same options to resume it, or another --checkpoint file"
            )
        return loaded

    def check_writable(self) -> None:
        """Raise `ReplayError` now if the checkpoint could not be saved later."""
        if self.path.is_dir():
            raise ReplayError(f"cannot write --checkpoint {self.path}: it is a directory")
        try:
            durable_files.check_writable(self.path)
        except OSError as exc:
            raise ReplayError(f"cannot write --checkpoint {self.path}: {exc.strerror}") from None

    def save(self, positions: Mapping[int, int]) -> None:
        data = {"replay": self.replay, "positions": {str(p): o for p, o in sorted(positions.items())}}
        try:
            durable_files.replace(self.path, orjson.dumps(data, option=orjson.OPT_INDENT_2))
        except OSError as exc:
            raise ReplayError(f"cannot write --checkpoint {self.path}: {exc.strerror}") from None


class SkippedRecords:
    """The records the destination refused for good, appended to a file as JSON Lines envelopes (the
    `--to-file` format), to be looked at and re-sent. The file (0600) is created at the first one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def add(self, event: Event | DecisionEvent) -> None:
        try:
            if self._file is None:
                self._file = durable_files.open_append(self.path)
            self._file.write(event.json_line())
        except OSError as exc:
            raise ReplayError(f"cannot write --skipped {self.path}: {exc.strerror}") from None

    def sync(self) -> None:
        if self._file is not None:
            durable_files.sync(self._file)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class RateLimit:
    """At most `per_second` starts per second, evenly spaced."""

    def __init__(self, per_second: float | None) -> None:
        self._interval = 0.0 if per_second is None else 1.0 / per_second
        self._next = time.monotonic()

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        delay, self._next = self._next - now, max(self._next, now) + self._interval
        if delay > 0:
            await asyncio.sleep(delay)  # pacing, not waiting for a condition


class Replay:
    """One run of a replay; `run()` returns the tally, `interrupted` and `failure` say how it ended."""

    def __init__(self, settings: ReplaySettings, sink: Sink, *, report: TextIO = sys.stderr) -> None:
        self._settings, self._sink, self._report = settings, sink, report
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.interrupted = False
        self.failure: str | None = None
        self._checkpoint = (
            Checkpoint(Path(settings.checkpoint), replay_identity(settings)) if settings.checkpoint else None
        )
        self._dedup = Deduplicator() if settings.dedup else None
        self.skipped = SkippedRecords(Path(settings.skipped))
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._rate = RateLimit(settings.rate)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._reader: EventReader | None = None
        self._copies_decisions = copies_decisions(settings)
        self._callbacks_in_flight: dict[CallbackId, asyncio.Event] = {}
        """The before-callbacks whose delivery has not ended (set when it has, landed or set aside): a
        decision read after one waits for it, so it lands after its callback even when that is retried."""

    def interrupt(self) -> None:
        """Stop reading (Ctrl-C); deliveries in flight finish and the checkpoint covers them."""
        self.stop.set()
        if self._reader is not None:
            self._reader.stop_reading()

    async def run(self, progress: Progress | None = None) -> Tally:
        settings = self._settings
        saved = self._checkpoint.load() if self._checkpoint else {}
        # The destination first: the reader's consumer exists only once it can be started and stopped.
        await self._sink.open()
        reader = EventReader(
            settings.bootstrap_servers,
            settings.topic,
            select=select_of(settings),
            start="beginning",
            start_offsets=saved or settings.from_offset,
            stop_offset=settings.to_offset,
            lateness_s=settings.lateness,
            manual_done=True,
            on_bad_record=self._bad_record,
            client_id=settings.client_id,
            kafka_options=settings.client_options(),
        )
        self._reader = reader
        try:
            async with reader:
                await self._copy(reader, progress)
        finally:
            self.skipped.close()
            await self._sink.close()
        if progress is not None:
            progress.update(self.tally, reader.progress(), final=True)
        return self.tally

    async def _copy(self, reader: EventReader, progress: Progress | None) -> None:
        last_saved = time.monotonic()
        try:
            read = reader.records if self._copies_decisions else reader.events
            async with contextlib.aclosing(read()) as events:
                async for event in events:
                    if self.stop.is_set():
                        break
                    await self._start_delivery(reader, event)
                    self._count(reader)
                    if progress is not None:
                        progress.update(self.tally, reader.progress())
                    if time.monotonic() - last_saved >= _CHECKPOINT_EVERY_S:
                        await self._save(reader)
                        last_saved = time.monotonic()
        finally:
            # Stopped or not, what is in flight finishes, so the checkpoint covers exactly what was copied.
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            self.interrupted = self.stop.is_set() and self.failure is None
            self._count(reader)
            await self._save(reader)

    def _count(self, reader: EventReader) -> None:
        self.tally.filtered_out = reader.stats.filtered_out
        if not self._copies_decisions:
            self.tally.decisions_passed_over = reader.stats.decisions

    async def _start_delivery(self, reader: EventReader, event: Event | DecisionEvent) -> None:
        # A decision is never dropped as a duplicate: each is one answer of the app server.
        if self._dedup is not None and isinstance(event, Event) and not self._dedup.first_time(event):
            self.tally.duplicates += 1
            reader.done(event)
            return
        await self._slots.acquire()
        await self._rate.wait()
        if self.stop.is_set():  # stopped while waiting: this record is left for the next run
            self._slots.release()
            return
        ended = None
        if self._decided(event):  # before its task runs: the decision read after it finds it here
            ended = self._callbacks_in_flight[event.identity] = asyncio.Event()
        task = asyncio.create_task(self._deliver(reader, event, ended))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _deliver(
        self, reader: EventReader, event: Event | DecisionEvent, ended: asyncio.Event | None = None
    ) -> None:
        """Deliver `event`; a decision first waits until its callback's delivery has ended. `ended` is set
        when a before-callback's has."""
        try:
            decision = isinstance(event, DecisionEvent)
            if decision and (callback := self._callbacks_in_flight.get(event.identity)) is not None:
                await callback.wait()  # its callback's delivery has not ended (or is tried again): after it
                if self.failure is not None:  # the replay stopped: the decision waits for the next run
                    return
            if await self._attempts(reader, event):
                self.tally.copied += 1
                if isinstance(event, DecisionEvent):
                    self.tally.decisions += 1
                reader.done(event)
        finally:
            self._slots.release()
            if ended is not None:
                ended.set()
                if self._callbacks_in_flight.get(event.identity) is ended:
                    del self._callbacks_in_flight[event.identity]

    async def _attempts(self, reader: EventReader, event: Event | DecisionEvent) -> bool:
        """Deliver `event`, trying again after a passing failure; False when it was not delivered (set aside,
        or the replay stopped)."""
        delay = _RETRY_FIRST_S
        for attempt in range(self._settings.retries + 1):
            try:
                await self._sink.deliver(event)
            except DeliveryFailed as exc:
                if exc.failure is Failure.RECORD:
                    self._set_aside(reader, event, exc.reason)
                    return False
                if exc.failure is Failure.DESTINATION:
                    self._fail(f"{event.coordinates}: {exc.reason}")
                    return False
                if attempt == self._settings.retries:
                    self._fail(f"{event.coordinates}: {exc.reason} (after {attempt} retries)")
                    return False
                if self.failure is not None:  # another delivery stopped the replay: no more retries
                    return False
                await asyncio.sleep(delay)  # backoff before a retry
                delay = min(delay * 2, _RETRY_MAX_S)
            else:
                return True
        return False

    def _decided(self, event: Event | DecisionEvent) -> bool:
        """Whether a decision record copied after `event` may follow it: a before-callback's."""
        return self._copies_decisions and isinstance(event, Event) and runs_before(event.command)

    def _set_aside(self, reader: EventReader, event: Event | DecisionEvent, reason: str) -> None:
        try:
            self.skipped.add(event)
        except ReplayError as exc:
            self._fail(f"{event.coordinates}: {reason}, and {exc}")
            return
        self.tally.refused += 1
        self._error(f"{event.coordinates}: refused, set aside in {self.skipped.path}: {reason}")
        reader.done(event)

    def _fail(self, reason: str) -> None:
        """Stop the replay; the event is not done, so the checkpoint stays before it for a re-run. The
        deliveries in flight that fail for the same reason count as one error with it."""
        if self.failure is None:
            self.tally.errors += 1
            self.failure = reason
        self.interrupt()

    async def _save(self, reader: EventReader) -> None:
        if self._checkpoint is not None:
            # The data before the checkpoint that says it is copied, each fsynced.
            await self._sink.flush()
            self.skipped.sync()
            self._checkpoint.save(reader.positions())

    def _bad_record(self, bad: BadRecord) -> None:
        self._error(str(bad))

    def _error(self, line: str) -> None:
        self.tally.errors += 1
        self._report.write(f"replay: {line}\n")


def select_of(settings: ReaderSettings) -> EventFilter:
    """The filter `--command`, `--account`, `--since` and `--until` ask for."""
    return EventFilter.of(
        commands=settings.command,
        entities=() if settings.account is None else (settings.account,),
        since=settings.since,
        until=settings.until,
    )


def window_problem(settings: ReaderSettings) -> str | None:
    """What is wrong with `--since` and `--until` together, if anything."""
    if settings.since is not None and settings.until is not None and settings.since >= settings.until:
        return "--since must be earlier than --until"
    return None


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def run_replay(settings: ReplaySettings) -> int:
    """`bridge replay`: 0 when all was copied, 1 when some records were not. Raises `CommandError` with status
    1 on a failure, 2 on bad usage (including a destination file or checkpoint that cannot be written, or a
    checkpoint of another replay), 3 when the Kafka cluster cannot be reached or refuses, 130 on Ctrl-C."""
    destinations = [d for d in (settings.to_topic, settings.to_file, settings.to_url) if d is not None]
    problem = window_problem(settings)
    if len(destinations) != 1:
        problem = "give exactly one destination: --to-topic, --to-file or --to-url"
    elif settings.to_topic == settings.topic:
        problem = "--to-topic must differ from --topic"
    elif settings.to_url is not None and settings.decisions == "include":
        problem = (
            "--to-url never posts a decision record (it is not a callback): "
            "give --decisions auto or skip, or --to-topic"
        )
    if problem is None:
        try:
            _check_files(settings)
        except ReplayError as exc:
            problem = str(exc)
    if problem is not None:
        raise CommandError(problem, ExitStatus.USAGE)
    return run_loop(_main(settings))


def _check_appendable(path: Path, option: str) -> None:
    existed = path.exists()
    try:
        durable_files.open_append(path).close()
    except OSError as exc:
        raise ReplayError(f"cannot write {option} {path}: {exc.strerror}") from None
    if not existed:
        path.unlink()


def _check_files(settings: ReplaySettings) -> None:
    """Before reading: the destination file, the skipped file (for a destination that can refuse records)
    and the checkpoint can be written, the checkpoint is ours."""
    if settings.to_file is not None:
        _check_appendable(Path(settings.to_file), "--to-file")
    else:
        _check_appendable(Path(settings.skipped), "--skipped")
    if settings.checkpoint is not None:
        checkpoint = Checkpoint(Path(settings.checkpoint), replay_identity(settings))
        checkpoint.check_writable()
        checkpoint.load()


async def _main(settings: ReplaySettings) -> int:
    replay = Replay(settings, sink_for(settings))
    progress = Progress(sys.stderr, "replay")
    try:
        with stop_signals(replay.interrupt):
            tally = await replay.run(progress)
    except (ReplayError, ReaderError, DeliveryFailed, OSError) as exc:
        raise CommandError(str(exc)) from None
    except KafkaError as exc:
        raise kafka_failed(exc, settings) from None
    summary = tally.summary(progress.elapsed)
    if tally.refused:
        summary += f"; {plural(tally.refused, 'record')} refused, set aside in {replay.skipped.path}"
    print(f"replay: {summary}", file=sys.stderr)
    if replay.failure is not None:
        again = f"; fix that and run the same command: --checkpoint {settings.checkpoint} continues here"
        hint = again if settings.checkpoint else ""
        raise CommandError(f"stopped: {replay.failure}{hint}")
    if replay.interrupted:
        hint = f"; run it again with --checkpoint {settings.checkpoint}" if settings.checkpoint else ""
        raise CommandError(f"interrupted{hint} to continue", ExitStatus.INTERRUPTED)
    return ExitStatus.FAILED if tally.errors else ExitStatus.OK
