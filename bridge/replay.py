"""`bridge replay`: copy the callbacks of a window (event time) or an offset range to a destination.

The reader (`consumer.EventReader`) finds the start, filters by event time on this side too and stops by
itself; deliveries run `--concurrency` at a time, under `--rate`, each retried `--retries` times when the
failure may pass. A delivery that fails for good (a 4xx, a record the broker refuses) is reported with its
coordinates and counted as an error; one that still fails after its retries stops the replay.

`--checkpoint FILE` holds, per partition, the offset below which every record is handled (copied, dropped
as a duplicate, filtered out or reported). It is written every second and at the end, after the
destination has confirmed or flushed what it covers, so a replay stopped with Ctrl-C and run again copies
every record once. After a crash, records copied since the last write are copied again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import orjson

from bridge.consumer import EventReader, ReaderError
from bridge.events import BadRecord, Deduplicator, Event, EventFilter
from bridge.kafka_security import kafka_connection_options
from bridge.progress import Progress, Tally
from bridge.settings import Settings
from bridge.sinks import DeliveryFailed, Sink, sink_for

_CHECKPOINT_EVERY_S = 1.0
_RETRY_FIRST_S, _RETRY_MAX_S = 0.2, 5.0


class ReplayError(RuntimeError):
    """The replay cannot start or cannot go on; the message says why."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Per-partition progress of a replay of one topic, in a JSON file replaced atomically."""

    path: Path
    topic: str

    def load(self) -> dict[int, int]:
        if not self.path.exists():
            return {}
        try:
            data = orjson.loads(self.path.read_bytes())
            topic, positions = data["topic"], data["positions"]
            loaded = {int(partition): int(offset) for partition, offset in positions.items()}
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ReplayError(f"checkpoint {self.path} cannot be read: {exc}") from None
        if topic != self.topic:
            raise ReplayError(f"checkpoint {self.path} is for topic {topic!r}, not {self.topic!r}")
        return loaded

    def save(self, positions: Mapping[int, int]) -> None:
        data = {"topic": self.topic, "positions": {str(p): o for p, o in sorted(positions.items())}}
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        os.replace(temporary, self.path)


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

    def __init__(self, settings: Settings, sink: Sink, *, report: TextIO = sys.stderr) -> None:
        self._settings, self._sink, self._report = settings, sink, report
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.interrupted = False
        self.failure: str | None = None
        self._checkpoint = (
            Checkpoint(Path(settings.checkpoint), settings.topic) if settings.checkpoint else None
        )
        self._dedup = Deduplicator() if settings.dedup else None
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._rate = RateLimit(settings.rate)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._reader: EventReader | None = None

    def interrupt(self) -> None:
        """Stop reading (Ctrl-C); deliveries in flight finish and the checkpoint covers them."""
        self.stop.set()
        if self._reader is not None:
            self._reader.stop_reading()

    async def run(self, progress: Progress | None = None) -> Tally:
        settings = self._settings
        saved = self._checkpoint.load() if self._checkpoint else {}
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
            kafka_options=kafka_connection_options(settings),
        )
        self._reader = reader
        await self._sink.open()
        try:
            async with reader:
                await self._copy(reader, progress)
        finally:
            await self._sink.close()
        if progress is not None:
            progress.update(self.tally, reader.progress(), final=True)
        return self.tally

    async def _copy(self, reader: EventReader, progress: Progress | None) -> None:
        last_saved = time.monotonic()
        try:
            async with contextlib.aclosing(reader.events()) as events:
                async for event in events:
                    if self.stop.is_set():
                        break
                    await self._start_delivery(reader, event)
                    self.tally.filtered_out = reader.stats.filtered_out
                    if progress is not None:
                        progress.update(self.tally, reader.progress())
                    if time.monotonic() - last_saved >= _CHECKPOINT_EVERY_S:
                        await self._save(reader)
                        last_saved = time.monotonic()
        finally:
            # Stopped or not, what is in flight finishes, so the checkpoint covers exactly what was copied.
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            self.interrupted = self.stop.is_set() and self.failure is None
            self.tally.filtered_out = reader.stats.filtered_out
            await self._save(reader)

    async def _start_delivery(self, reader: EventReader, event: Event) -> None:
        if self._dedup is not None and not self._dedup.first_time(event.key):
            self.tally.duplicates += 1
            reader.done(event)
            return
        await self._slots.acquire()
        await self._rate.wait()
        task = asyncio.create_task(self._deliver(reader, event))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _deliver(self, reader: EventReader, event: Event) -> None:
        delay = _RETRY_FIRST_S
        try:
            for attempt in range(self._settings.retries + 1):
                try:
                    await self._sink.deliver(event)
                except DeliveryFailed as exc:
                    if not exc.retriable:
                        self._error(f"{event.coordinates}: not copied: {exc.reason}")
                        reader.done(event)
                        return
                    if attempt == self._settings.retries:
                        # Not done: the checkpoint stays before this record, so a re-run tries it again.
                        self.failure = f"{event.coordinates}: {exc.reason} (after {attempt} retries)"
                        self.interrupt()
                        return
                    await asyncio.sleep(delay)  # backoff before a retry
                    delay = min(delay * 2, _RETRY_MAX_S)
                else:
                    self.tally.copied += 1
                    reader.done(event)
                    return
        finally:
            self._slots.release()

    async def _save(self, reader: EventReader) -> None:
        if self._checkpoint is not None:
            await self._sink.flush()
            self._checkpoint.save(reader.positions())

    def _bad_record(self, bad: BadRecord) -> None:
        self._error(str(bad))

    def _error(self, line: str) -> None:
        self.tally.errors += 1
        self._report.write(f"replay: {line}\n")


def select_of(settings: Settings) -> EventFilter:
    """The filter `--command`, `--account`, `--since` and `--until` ask for."""
    return EventFilter.of(
        commands=settings.command,
        entities=() if settings.account is None else (settings.account,),
        since=settings.since,
        until=settings.until,
    )


def run_replay(settings: Settings) -> int:
    """`bridge replay`: 0 when all was copied, 1 on errors or failure, 2 on bad usage, 130 on Ctrl-C."""
    destinations = [d for d in (settings.to_topic, settings.to_file, settings.to_url) if d is not None]
    problem = None
    if not settings.bootstrap_servers:
        problem = "no Kafka brokers given: pass --bootstrap-servers or set BRIDGE_BOOTSTRAP_SERVERS"
    elif len(destinations) != 1:
        problem = "give exactly one destination: --to-topic, --to-file or --to-url"
    elif settings.to_topic == settings.topic:
        problem = "--to-topic must differ from --topic"
    if problem is not None:
        print(f"bridge replay: {problem}", file=sys.stderr)
        return 2
    return asyncio.run(_main(settings))


async def _main(settings: Settings) -> int:
    replay = Replay(settings, sink_for(settings))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, replay.interrupt)
    progress = Progress(sys.stderr, "replay")
    try:
        tally = await replay.run(progress)
    except (ReplayError, ReaderError, DeliveryFailed) as exc:
        print(f"bridge replay: {exc}", file=sys.stderr)
        return 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print(f"replay: {tally.summary(progress.elapsed)}", file=sys.stderr)
    if replay.failure is not None:
        print(f"bridge replay: stopped: {replay.failure}", file=sys.stderr)
        return 1
    if replay.interrupted:
        hint = f"; run it again with --checkpoint {settings.checkpoint}" if settings.checkpoint else ""
        print(f"bridge replay: interrupted{hint} to continue", file=sys.stderr)
        return 130
    return 1 if tally.errors else 0
