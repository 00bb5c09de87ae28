"""Duplicates at the edge: a callback already in flight or just confirmed is not written again.

Tencent sends a callback again when it timed out waiting (with "retry on timeout" on), and a second copy
often arrives while the first is still waiting for the broker. The copy waits for the first write's outcome
instead of writing again; a copy of one confirmed within the window is answered at once. This is an
optimisation, not a guarantee: restarts, several replicas and ambiguous outcomes still let duplicates into
Kafka, so consumers deduplicate by key too.

A copy that stops waiting without an answer of its own (its deadline passed, or its handler was cancelled
at shutdown) is an ambiguous answer whose record is the first write's: it is counted `ambiguous_landed` or
`ambiguous_lost` as that write ends.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bridge.errors import DeliveryTimeout, Unavailable
from bridge.ingest.outcomes import Outcome, Outcomes
from bridge.tencent.envelope import CallbackId


@dataclass
class _Write:
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    confirmed: bool = False
    failure: BaseException | None = None
    followers: int = 0
    """Copies answered ambiguous while this write went on: each ends as this write's record ends."""


class EdgeDedup:
    """Remembers confirmed callbacks for `window_s` seconds, at most `max_keys` of them and `max_bytes`.

    The bytes of a remembered callback are its id string's size plus `ENTRY_OVERHEAD`, the ordered dict's
    node, its share of the hash table and the confirmation time (measured with tracemalloc: 90 to 124
    bytes, depending on how full the table is), so the window's memory stays under `max_bytes` however
    long the keys are.
    """

    ENTRY_OVERHEAD = 150

    def __init__(
        self,
        window_s: float,
        max_keys: int,
        max_bytes: int = 32 << 20,
        clock: Callable[[], float] = time.monotonic,
        outcomes: Outcomes | None = None,
    ) -> None:
        """`outcomes` is told how the records of copies answered ambiguous ended."""
        self._window_s = window_s
        self._max_keys = max_keys
        self._max_bytes = max_bytes
        self._clock = clock
        self._outcomes = outcomes
        self._confirmed: OrderedDict[CallbackId, float] = OrderedDict()
        self._writing: dict[CallbackId, _Write] = {}
        self.remembered_bytes = 0

    @property
    def remembered(self) -> int:
        return len(self._confirmed)

    async def publish_once(
        self, callback_id: CallbackId, publish: Callable[[float], Awaitable[None]], deadline: float
    ) -> Outcome:
        """Write once per callback id; `publish(timeout)` writes; `deadline` is on the event loop's clock.

        Returns CONFIRMED for a write of its own, or the kind of duplicate; raises `PublishError`.
        """
        if self._confirmed_recently(callback_id):
            return Outcome.DUPLICATE_CONFIRMED
        loop = asyncio.get_running_loop()
        while (earlier := self._writing.get(callback_id)) is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    await earlier.settled.wait()
            except TimeoutError:
                self._follow(earlier)
                raise DeliveryTimeout(
                    "an identical callback is still waiting for Kafka's confirmation; this copy is not "
                    "acknowledged",
                    ambiguous=True,
                ) from None
            except asyncio.CancelledError:
                self._follow(earlier)
                raise
            if earlier.confirmed:
                return Outcome.DUPLICATE_IN_FLIGHT
            # The earlier write failed: this copy tries for itself, unless another copy already does.
        write = self._writing[callback_id] = _Write()
        try:
            await publish(max(deadline - loop.time(), 0.0))
            write.confirmed = True
            self._remember(callback_id)
        except BaseException as exc:
            write.failure = exc
            raise
        finally:
            write.settled.set()
            del self._writing[callback_id]
            if write.followers:
                self._settle_followers(write, write.followers)
        return Outcome.CONFIRMED

    def _follow(self, write: _Write) -> None:
        """A copy of `write` stopped waiting: its record is that write's; count how it ends."""
        if write.settled.is_set():
            self._settle_followers(write, 1)  # it ended in the same turn
        else:
            write.followers += 1

    def _settle_followers(self, write: _Write, count: int) -> None:
        outcomes = self._outcomes
        if outcomes is None:
            return

        def ended(landed: bool) -> None:
            for _ in range(count):
                outcomes.record(Outcome.AMBIGUOUS_LANDED if landed else Outcome.AMBIGUOUS_LOST)

        failure = write.failure
        if write.confirmed:
            ended(True)
        elif isinstance(failure, Unavailable) and failure.ambiguous and failure.fate is not None:
            failure.fate.add_done_callback(lambda fate: ended(fate.result()))
        else:
            # Not written, a bug, or the write's own handler cancelled: the producer follows that record
            # for the write itself, but not for its copies, which count it as lost.
            ended(False)

    def _confirmed_recently(self, callback_id: CallbackId) -> bool:
        confirmed_at = self._confirmed.get(callback_id)
        return confirmed_at is not None and self._clock() - confirmed_at <= self._window_s

    def _remember(self, callback_id: CallbackId) -> None:
        if self._window_s <= 0 or self._max_keys <= 0:
            return
        now = self._clock()
        if callback_id in self._confirmed:
            self._confirmed.move_to_end(callback_id)
        else:
            self.remembered_bytes += sys.getsizeof(callback_id) + self.ENTRY_OVERHEAD
        self._confirmed[callback_id] = now
        while self._confirmed:
            oldest_id, oldest_at = next(iter(self._confirmed.items()))
            if (
                len(self._confirmed) <= self._max_keys
                and self.remembered_bytes <= self._max_bytes
                and now - oldest_at <= self._window_s
            ):
                break
            del self._confirmed[oldest_id]
            self.remembered_bytes -= sys.getsizeof(oldest_id) + self.ENTRY_OVERHEAD
