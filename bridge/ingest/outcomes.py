"""What became of every callback: the counts behind the bridge's delivery guarantee.

A 200 is `confirmed` (this request's write was acknowledged) or a duplicate (the same callback was confirmed
in the dedup window, or was in flight and then confirmed). A 4xx is `rejected`. A 503 is `failed` (nothing
was handed to Kafka, or the broker said it did not append) or `ambiguous` (the record may still land).
Ambiguous records are followed to their end: `ambiguous_landed` or `ambiguous_lost`.
"""

from __future__ import annotations

from enum import StrEnum

from bridge.errors import BridgeError, Overloaded, Unavailable


class Outcome(StrEnum):
    CONFIRMED = "confirmed"
    DUPLICATE_IN_FLIGHT = "duplicate_in_flight"
    DUPLICATE_CONFIRMED = "duplicate_confirmed"
    REJECTED = "rejected"
    FAILED = "failed"
    OVERLOADED = "overloaded"
    AMBIGUOUS = "ambiguous"
    AMBIGUOUS_LANDED = "ambiguous_landed"
    AMBIGUOUS_LOST = "ambiguous_lost"


def outcome_of(error: BridgeError) -> Outcome:
    """The outcome of a callback answered with `error`."""
    if isinstance(error, Overloaded):
        return Outcome.OVERLOADED
    if isinstance(error, Unavailable):
        return Outcome.AMBIGUOUS if error.ambiguous else Outcome.FAILED
    return Outcome.REJECTED if error.status < 500 else Outcome.FAILED


class Outcomes:
    """Counters of outcomes, one per `Outcome`; every counter starts at zero so none goes unreported."""

    def __init__(self) -> None:
        self.counts: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        """A plain dict: the request path adds to it directly (`bridge.ingest.metrics.Metrics.answered`)."""

    def record(self, outcome: Outcome) -> None:
        self.counts[outcome] += 1

    def ambiguous_ended(self, landed: bool) -> None:
        """A record answered ambiguous has ended: it landed, or it was given up."""
        self.counts[Outcome.AMBIGUOUS_LANDED if landed else Outcome.AMBIGUOUS_LOST] += 1

    def snapshot(self) -> dict[str, int]:
        return {outcome.value: self.counts[outcome] for outcome in Outcome}
