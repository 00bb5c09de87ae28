"""The history of a chaos run, written to a file, and the check of that history against what Kafka holds.

A history is what the clients sent (each callback with the record it must become: topic, key, owning
entity, query, body), every attempt to deliver it (when it started and ended, the answer and the outcome
the bridge reported), every fault (what, when, on which node or topic), and each topic's partition counts.
`judge` compares it with every record of every bridge topic:

- a callback answered 200 must be in Kafka, with the right value (envelope, query, the body byte for
  byte), key, partition and headers;
- a callback answered 4xx must not be, nor one whose every answer said nothing was handed to Kafka;
- no answer is a 500, no valid callback is refused and no invalid one accepted;
- a callback present more than once is a duplicate, attributed to an ambiguous answer, to the faults that
  overlapped its delivery, or to nothing (then it is listed).

The file is JSON Lines: a `run` line (the parameters, the topics), then `callback`, `attempt` and `fault`
lines, and a `verdict` line. `python -m tests.chaos --replay FILE` runs the same fault schedule again.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord

from bridge.tencent.partitioner import partition_for

ENVELOPE_SCHEMA = "tencent-chat-callback/1"
NOT_WRITTEN = frozenset({"failed", "overloaded"})
"""Outcomes by which the bridge says it handed nothing to Kafka."""


@dataclass(frozen=True)
class Callback:
    """One callback a client sent, and the record it must become."""

    id: str
    kind: str
    topic: str
    key: str
    entity: str
    command: str
    query: dict[str, str]
    body: bytes
    valid: bool


@dataclass(frozen=True)
class Attempt:
    """One request carrying a callback: a first send, a concurrent copy, or a retry after a 503."""

    id: str
    why: str
    """"send", "copy" (sent concurrently with the first) or "retry" (after a 503, as Tencent does)."""
    started: float
    ended: float
    status: int | str
    """The HTTP status, or the client's exception name when no answer came."""
    outcome: str
    """The bridge's X-Bridge-Outcome header; "none" without one."""
    bridge: int
    """Which start of the bridge was running when the request was sent (SIGTERM faults restart it)."""


@dataclass(frozen=True)
class Fault:
    kind: str
    detail: str
    started: float
    ended: float
    """When it was healed and what it broke was back (nodes up, the bridge ready)."""
    gap: float = 0.0
    hold: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    """What `tests.chaos.plan` drew: replaying a history runs the same gaps, holds and params."""


@dataclass
class History:
    """Times are seconds since the load started."""

    run: dict[str, Any] = field(default_factory=dict)
    t0: float = 0.0
    """The monotonic clock when the load started."""
    callbacks: dict[str, Callback] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    partition_counts: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    """Every partition count each topic had while the bridge wrote to it."""
    proxy: dict[str, int] = field(default_factory=dict)
    """What the fault proxies did, summed over them: Produce requests seen, refused, partitions withheld."""
    stops: list[float] = field(default_factory=list)
    """When the bridge was sent SIGTERM: a request in flight then must still get its answer."""
    kept: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    """Records read from a topic just before a fault deleted it: they were in Kafka until then."""

    def write(self, path: Path, report: Report | None = None) -> None:
        with path.open("wb") as out:

            def line(kind: str, data: Mapping[str, Any]) -> None:
                out.write(orjson.dumps({"type": kind, **data}, default=_jsonable) + b"\n")

            line(
                "run",
                {**self.run, "partition_counts": {t: sorted(c) for t, c in self.partition_counts.items()}},
            )
            for callback in self.callbacks.values():
                line("callback", {**asdict(callback), "body": callback.body.decode()})
            for attempt in self.attempts:
                line("attempt", asdict(attempt))
            for fault in self.faults:
                line("fault", asdict(fault))
            if report is not None:
                line("verdict", report.summary())


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def read_run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The `run` line of a history file and its `fault` lines."""
    run: dict[str, Any] = {}
    faults: list[dict[str, Any]] = []
    for raw in path.read_bytes().splitlines():
        entry = orjson.loads(raw)
        if entry["type"] == "run":
            run = entry
        elif entry["type"] == "fault":
            faults.append(entry)
    return run, faults


@dataclass
class Report:
    duration_s: float
    requests: int
    answers: Counter[str]
    outcomes: dict[str, int]
    callbacks_by_topic: Counter[str]
    confirmed: int
    missing: list[str]
    """Answered 200, not in Kafka."""
    wrong_content: list[str]
    """In Kafka, but its value, key, partition or headers are not what the callback must become: `id: why`."""
    rejected_but_present: list[str]
    failed_but_present: list[str]
    """Every answer said nothing was handed to Kafka (`failed`, `overloaded`), yet it is there."""
    server_errors: list[str]
    """Answered 500, or another 5xx than 503."""
    valid_refused: list[str]
    """A valid callback answered 4xx."""
    unanswered_at_stop: list[str]
    """A request in flight when the bridge was sent SIGTERM that got no answer."""
    invalid_accepted: list[str]
    """An invalid callback answered 200."""
    answered_503_landed: int
    answered_503_absent: int
    duplicates: Counter[str]
    """Callbacks present more than once, by what explains it."""
    extra_copies: int
    faults: Counter[str]
    proxy: dict[str, int] = field(default_factory=dict)

    @property
    def unsettled_ambiguous(self) -> int:
        """Ambiguous answers minus those whose record was followed to its end: 0 once all has settled."""
        outcomes = self.outcomes
        return outcomes["ambiguous"] - outcomes["ambiguous_landed"] - outcomes["ambiguous_lost"]

    @property
    def broken(self) -> bool:
        return any(
            (
                self.missing,
                self.wrong_content,
                self.rejected_but_present,
                self.failed_but_present,
                self.server_errors,
                self.valid_refused,
                self.invalid_accepted,
                self.unanswered_at_stop,
            )
        )

    def problems(self) -> dict[str, list[str]]:
        return {
            "answered 200 but not in Kafka": self.missing,
            "in Kafka with the wrong value, key, partition or headers": self.wrong_content,
            "answered 4xx but in Kafka": self.rejected_but_present,
            "answered 503 'nothing written' but in Kafka": self.failed_but_present,
            "answered 500 or another 5xx than 503": self.server_errors,
            "valid but answered 4xx": self.valid_refused,
            "invalid but answered 200": self.invalid_accepted,
            "in flight at SIGTERM, never answered": self.unanswered_at_stop,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "broken": self.broken,
            **{name: len(ids) for name, ids in self.problems().items()},
            "requests": self.requests,
            "answers": dict(self.answers),
            "duplicates": dict(self.duplicates),
        }

    def table(self) -> str:
        rows = [
            ("duration", f"{self.duration_s:.0f} s"),
            ("requests", f"{self.requests} ({self.requests / max(self.duration_s, 1e-9):.0f}/s)"),
            *((f"callbacks to {topic}", str(n)) for topic, n in sorted(self.callbacks_by_topic.items())),
            *((f"answered {status}", str(count)) for status, count in sorted(self.answers.items())),
            *((f"outcome {name}", str(count)) for name, count in self.outcomes.items() if count),
            ("callbacks confirmed (a 200)", str(self.confirmed)),
            *((name, str(len(ids))) for name, ids in self.problems().items()),
            ("503'd callbacks in Kafka anyway", str(self.answered_503_landed)),
            ("503'd callbacks absent", str(self.answered_503_absent)),
            *((f"in Kafka more than once: {why}", str(n)) for why, n in sorted(self.duplicates.items())),
            ("extra copies in Kafka", str(self.extra_copies)),
            ("ambiguous answers not followed to their end", str(self.unsettled_ambiguous)),
            *((f"fault {name}", str(count)) for name, count in sorted(self.faults.items())),
            *((f"proxies: {name}", str(count)) for name, count in self.proxy.items()),
            ("verdict", "BROKEN" if self.broken else "every 200 is in Kafka as sent, no 4xx is"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)


def judge(
    history: History,
    records: Iterable[ConsumerRecord[bytes, bytes]],
    outcomes: dict[str, int],
    elapsed: float,
) -> Report:
    present: dict[tuple[str, str], list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
    for record in [*history.kept, *records]:
        if record.key is not None:
            present[record.topic, record.key.decode()].append(record)
    keys_anywhere = {key for _, key in present}
    attempts: dict[str, list[Attempt]] = defaultdict(list)
    for attempt in history.attempts:
        attempts[attempt.id].append(attempt)
    tally = _Tally(history)
    for callback in history.callbacks.values():
        tries = attempts[callback.id]
        if callback.valid:
            tally.valid(callback, tries, present.get((callback.topic, callback.key), []))
        else:
            tally.invalid(callback, tries, callback.key in keys_anywhere)
    return Report(
        duration_s=elapsed,
        requests=len(history.attempts),
        answers=Counter(str(attempt.status) for attempt in history.attempts),
        outcomes=outcomes,
        callbacks_by_topic=Counter(callback.topic for callback in history.callbacks.values()),
        confirmed=sum(1 for tries in attempts.values() if any(a.status == 200 for a in tries)),
        missing=tally.missing,
        wrong_content=tally.wrong,
        rejected_but_present=tally.rejected_present,
        failed_but_present=tally.failed_present,
        server_errors=tally.server_errors,
        valid_refused=tally.valid_refused,
        invalid_accepted=tally.invalid_accepted,
        unanswered_at_stop=[
            attempt.id
            for attempt in history.attempts
            if isinstance(attempt.status, str)
            and any(attempt.started < stop < attempt.ended for stop in history.stops)
        ],
        answered_503_landed=tally.landed_503,
        answered_503_absent=tally.absent_503,
        duplicates=tally.duplicates,
        extra_copies=tally.extra,
        faults=Counter(fault.kind for fault in history.faults),
        proxy=history.proxy,
    )


@dataclass
class _Tally:
    history: History
    missing: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    rejected_present: list[str] = field(default_factory=list)
    failed_present: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    valid_refused: list[str] = field(default_factory=list)
    invalid_accepted: list[str] = field(default_factory=list)
    landed_503: int = 0
    absent_503: int = 0
    duplicates: Counter[str] = field(default_factory=Counter)
    extra: int = 0

    def _statuses(self, callback: Callback, tries: list[Attempt]) -> set[int | str]:
        statuses = {attempt.status for attempt in tries}
        if any(isinstance(s, int) and s >= 500 and s != 503 for s in statuses):
            self.server_errors.append(callback.id)
        return statuses

    def invalid(self, callback: Callback, tries: list[Attempt], present: bool) -> None:
        if 200 in self._statuses(callback, tries):
            self.invalid_accepted.append(callback.id)
        if present:
            self.rejected_present.append(callback.id)

    def valid(
        self, callback: Callback, tries: list[Attempt], copies: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        statuses = self._statuses(callback, tries)
        if any(isinstance(s, int) and 400 <= s < 500 for s in statuses):
            self.valid_refused.append(callback.id)
        if 200 in statuses:
            if not copies:
                self.missing.append(callback.id)
        elif copies and tries and all(attempt.outcome in NOT_WRITTEN for attempt in tries):
            self.failed_present.append(callback.id)
        elif 503 in statuses:
            self.landed_503 += bool(copies)
            self.absent_503 += not copies
        counts = self.history.partition_counts
        if problems := [p for record in copies if (p := _content_wrong(callback, record, counts))]:
            self.wrong.append(f"{callback.id}: {problems[0]}")
        if len(copies) > 1:
            self.duplicates[_why_duplicated(tries, self.history.faults)] += 1
            self.extra += len(copies) - 1


def _content_wrong(
    callback: Callback, record: ConsumerRecord[bytes, bytes], counts: Mapping[str, set[int]]
) -> str | None:
    """What is wrong with `record` as the record of `callback`, or None."""
    expected_partitions = {partition_for(callback.entity, n) for n in counts.get(callback.topic, ())}
    if record.partition not in expected_partitions:
        return f"partition {record.partition}, not one of {sorted(expected_partitions)}"
    expected_headers = [
        ("CallbackCommand", callback.command.encode()),
        ("SdkAppid", callback.query["SdkAppid"].encode()),
        ("content-type", b"application/json"),
        ("entity", callback.entity.encode()),
        ("received_at", str(_received_at(record.value or b"")).encode()),
        ("schema", ENVELOPE_SCHEMA.encode()),
    ]
    if sorted(record.headers) != sorted(expected_headers):
        return f"headers {record.headers}"
    return _value_wrong(callback, record.value or b"")


def _received_at(value: bytes) -> object:
    """The envelope's `received_at`, which the `received_at` header repeats; None if there is none."""
    try:
        envelope = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return envelope.get("received_at") if isinstance(envelope, dict) else None


def _value_wrong(callback: Callback, value: bytes) -> str | None:
    if callback.body not in value:
        return "the body is not in the value byte for byte"
    try:
        envelope = orjson.loads(value)
    except orjson.JSONDecodeError:
        return "the value is not JSON"
    if envelope.get("schema") != ENVELOPE_SCHEMA or not isinstance(envelope.get("received_at"), int):
        return "not an envelope"
    if envelope.get("query") != callback.query:
        return f"query {envelope.get('query')}"
    if envelope.get("callback") != orjson.loads(callback.body):
        return "callback differs"
    return None


def _why_duplicated(tries: list[Attempt], faults: list[Fault]) -> str:
    """An answer that left the record's fate open explains a second copy (the producer's retry, or Tencent's
    after a 503); otherwise a fault during its delivery that can cut or falsify a Produce answer may."""
    if any(attempt.outcome == "ambiguous" or isinstance(attempt.status, str) for attempt in tries):
        return "an ambiguous answer (sent again)"
    if tries:
        started = min(attempt.started for attempt in tries)
        ended = max(attempt.ended for attempt in tries)
        overlapping = sorted(
            {fault.kind for fault in faults if fault.started <= ended and fault.ended >= started}
        )
        if overlapping:
            return f"during {'+'.join(overlapping)}"
    return "unexplained"
