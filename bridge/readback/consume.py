"""`bridge consume`: print a topic's callbacks as JSON Lines, one envelope per line, for jq, pandas, duckdb.

Records of either record format print alike: a `cloudevents` record as the envelope the `envelope` format
would have written for it (`Event.json_line`), so a job downstream never needs to know which format a
bridge was told to write, and a topic holding both reads as one.

With `--group`, an event is committed only after its line is written and flushed, and before each commit
an `--output` file is fsynced, so after a power loss the commits are never ahead of the file. An `--output`
file is created 0600: it holds user messages.
"""

from __future__ import annotations

import contextlib
import sys
from typing import IO

from aiokafka.errors import KafkaError

from bridge.errors import CommandError, ExitStatus
from bridge.process import kafka_failed, run_loop, stop_signals
from bridge.readback import durable_files
from bridge.readback.events import BadRecord
from bridge.readback.reader import EventReader, ReaderError
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
    written = 0
    try:
        with stop_signals(reader.stop_reading):
            async with reader, contextlib.aclosing(reader.events()) as events:
                if not (from_start or settings.follow or settings.group):
                    print(
                        "consume: reading from the end of the topic; give --from-beginning, --since, "
                        "--group or --follow to see events",
                        file=sys.stderr,
                    )
                async for event in events:
                    output.write(event.json_line())
                    if flush_each:
                        output.flush()
                    reader.done(event)
                    written += 1
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
        f"consume: {plural(written, 'event')} written, {stats.filtered_out} filtered out, "
        f"{plural(stats.bad, 'bad record')}"
        + (f", {plural(stats.decisions, 'app decision')} passed over" if stats.decisions else ""),
        file=sys.stderr,
    )
    return ExitStatus.OK
