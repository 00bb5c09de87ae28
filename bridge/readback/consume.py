"""`bridge consume`: print a topic's callbacks as JSON Lines, one envelope per line, for jq, pandas, duckdb.

Records of either record format print alike: a `cloudevents` record as the envelope the `envelope` format
would have written for it (`Event.json_line`), so a job downstream never needs to know which format a
bridge was told to write, and a topic holding both reads as one.

Forward mode's decision records are passed over (counted) unless `--decisions include` (or `only`) asks
for them: each is printed as its record value, of schema `tencent-chat-kafka-bridge/app-decision/1`, after
its callback's line (`EventReader.records`).

With `--group`, an event is committed only after its line is written and flushed, and before each commit
an `--output` file is fsynced, so after a power loss the commits are never ahead of the file. An `--output`
file is created 0600: it holds user messages.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from typing import IO

from aiokafka.errors import KafkaError

from bridge.errors import CommandError, ExitStatus
from bridge.process import kafka_failed, run_loop, stop_signals
from bridge.readback import durable_files
from bridge.readback.decisions import DecisionEvent
from bridge.readback.events import BadRecord, Event
from bridge.readback.reader import EventReader, ReaderError, ReaderStats
from bridge.readback.replay import plural, select_of, window_problem
from bridge.settings import ConsumeSettings


def run_consume(settings: ConsumeSettings) -> int:
    """0 when done or stopped with Ctrl-C. Raises `CommandError` with status 1 when the topic cannot be
    read or the output written; 2 on bad usage (a window that ends before it starts, an --output that
    cannot be opened); 3 when the Kafka cluster cannot be reached or refuses."""
    problem = window_problem(settings)
    if problem is not None:
        raise CommandError(problem, ExitStatus.USAGE)
    if settings.output == "-":
        return run_loop(_consume(settings, sys.stdout.buffer))
    try:
        output = durable_files.open_append(settings.output)  # before the loop, to fail early; closed below
    except OSError as exc:
        raise CommandError(
            f"cannot write --output {settings.output}: {exc.strerror}", ExitStatus.USAGE
        ) from None
    with output:
        return run_loop(_consume(settings, output))


def _report_bad(bad: BadRecord) -> None:
    print(f"consume: {bad}", file=sys.stderr)


async def _consume(settings: ConsumeSettings, output: IO[bytes]) -> int:
    from_start = settings.from_beginning or settings.since is not None
    reader = EventReader(
        settings.bootstrap_servers,
        settings.topic,
        select=select_of(settings),
        group=settings.group,
        start="beginning" if from_start else "end",
        follow=settings.follow,
        lateness_s=settings.lateness,
        manual_done=True,
        on_bad_record=_report_bad,
        before_commit=lambda: durable_files.sync(output),
        client_id=settings.client_id,
        kafka_options=settings.client_options(),
    )
    # Line by line when someone watches or a group commits what was written; else in blocks, for speed.
    flush_each = settings.follow or settings.group is not None or output.isatty()
    written = callbacks_passed_over = 0
    kinds = Counter[str]()
    try:
        with stop_signals(reader.stop_reading):
            read = reader.events if settings.decisions == "skip" else reader.records
            async with reader, contextlib.aclosing(read()) as events:
                if not (from_start or settings.follow or settings.group):
                    print(
                        "consume: reading from the end of the topic; give --from-beginning, --since, "
                        "--group or --follow to see events",
                        file=sys.stderr,
                    )
                async for event in events:
                    if settings.decisions == "only" and isinstance(event, Event):
                        reader.done(event)
                        callbacks_passed_over += 1
                        continue
                    output.write(event.json_line())
                    if flush_each:
                        output.flush()
                    reader.done(event)
                    written += 1
                    kinds["decision" if isinstance(event, DecisionEvent) else "callback"] += 1
                    if settings.max is not None and written >= settings.max:
                        break
                output.flush()
    except ReaderError as exc:
        raise CommandError(str(exc)) from None
    except KafkaError as exc:
        raise kafka_failed(exc, settings) from None
    except BrokenPipeError:  # `bridge consume | head`
        return ExitStatus.OK
    except OSError as exc:
        raise CommandError(f"cannot write --output {settings.output}: {exc}") from None
    stats = reader.stats
    print(
        f"consume: {_summary(settings.decisions, written, kinds, stats, callbacks_passed_over)}",
        file=sys.stderr,
    )
    return ExitStatus.OK


def _summary(
    decisions: str, written: int, kinds: Counter[str], stats: ReaderStats, callbacks_passed_over: int
) -> str:
    """What was written and what was not, by kind of record when decisions were asked for."""
    if decisions == "skip":
        what = plural(written, "event") + " written"
    elif decisions == "include":
        callbacks, decided = plural(kinds["callback"], "callback"), plural(kinds["decision"], "app decision")
        what = f"{plural(written, 'event')} written ({callbacks}, {decided})"
    else:
        what = f"{plural(written, 'app decision')} written"
    line = f"{what}, {stats.filtered_out} filtered out, {plural(stats.bad, 'bad record')}"
    if decisions == "skip" and stats.decisions:
        line += f", {plural(stats.decisions, 'app decision')} passed over"
    if callbacks_passed_over:
        line += f", {plural(callbacks_passed_over, 'callback')} passed over"
    return line
