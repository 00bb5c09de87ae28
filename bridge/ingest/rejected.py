"""Keeping the authentic callbacks that fail validation in the dead-letter topic, before their 400.

The handler calls `DeadLetters.keep` where `parse_callback` refused a callback with one of
`bridge.tencent.rejected.DEAD_LETTERED` (not JSON, not an object, an unrepresentable number, a field of the
wrong type or missing, a command mismatch): by then the query, the signature and the app were checked and the
body was read within the limits, so the request is Tencent's and whole. `keep` writes the raw record through
the bridge's publisher (acks=all, the callback's own deadline and in-flight slot) and returns once the broker
confirmed it; the handler then answers the same 400 as ever. When the write fails or the deadline passes,
`keep` raises the publisher's 503 (the same class, ErrorCode and ambiguity), its `ErrorInfo` saying the
callback was refused and why, and that it could not be kept: Tencent does not retry a 400, and may retry a 503
after a timeout (when its console says so), so a callback the bridge could not keep is never answered as if
it had been dealt with.

Counting: a kept callback's outcome is `rejected`, as before (its answer is the 400), and
`bridge_dead_lettered_total{reason}` and `/stats`' `dead_lettered` count it; one that could not be kept has
the outcome of its failed write (`failed`, or `ambiguous` when the dead-letter record may still land), and
counts in `bridge_dead_letter_failures_total{reason}` and `bridge_publish_errors_total{kind}`.
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.errors import BadCallback, PublishError, RecordTooLarge
from bridge.ingest.metrics import Call, Metrics
from bridge.ingest.outcomes import Outcome
from bridge.kafka.publisher import Publisher
from bridge.tencent.protocol import CallbackQuery
from bridge.tencent.rejected import reason_of, rejected_record


class DeadLetters:
    """Writes rejected callbacks to `topic` (None: kept nowhere) through the publisher `publisher()` gives
    (the app's, which exists only once the app runs), and counts them in `metrics`."""

    def __init__(self, topic: str | None, publisher: Callable[[], Publisher], metrics: Metrics) -> None:
        self.topic = topic
        self._publisher = publisher
        self._metrics = metrics
        self.kept = 0

    async def keep(
        self,
        call: Call,
        error: BadCallback,
        query: CallbackQuery,
        raw_body: bytes,
        *,
        received_at_ms: int,
        deadline: float,
    ) -> None:
        """Return once the broker confirmed the dead-letter record of this refused callback (at once when the
        dead-letter topic is off); raise the write's `PublishError`, reworded, if it was not confirmed."""
        if self.topic is None:
            return
        reason = reason_of(error)
        record = rejected_record(self.topic, query, raw_body, error, received_at_ms)
        # Until the write answers: a handler cancelled now (at shutdown) leaves a record that may still land.
        call.outcome = Outcome.AMBIGUOUS
        try:
            await self._publisher().publish(record, deadline)
        except PublishError as failure:
            self._metrics.dead_letter_failed(reason)
            kept_not = type(failure)(
                f"{self._refused(error)} and could not be kept in the dead-letter topic {self.topic}: "
                f"{failure.info}",
                ambiguous=failure.ambiguous,
                fate=failure.fate,
            )
            # The Kafka error behind the failure, if any, still names its kind in the metrics.
            raise kept_not from failure.__cause__ or failure.__context__
        except RecordTooLarge as too_large:
            # Only with a --max-url-bytes far above its default: sending it again cannot help, so a 413.
            self._metrics.dead_letter_failed(reason)
            raise RecordTooLarge(f"{self._refused(error)} and could not be kept: {too_large.info}") from None
        self.kept += 1
        self._metrics.dead_lettered(reason)

    @staticmethod
    def _refused(error: BadCallback) -> str:
        return f"the callback was refused ({error.error_code}: {error.info})"
