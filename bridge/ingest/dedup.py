"""Duplicates at the edge: a callback already in flight or just confirmed is not written again.

Tencent sends a callback again when it timed out waiting (with "retry on timeout" on), and a second copy
often arrives while the first is still waiting for the broker. The copy waits for the first write's outcome
instead of writing again; a copy of one confirmed within the window is answered at once. The handler holds
a `Claim` (`async with dedup.claim(identity, deadline) as claim:`, or on the request path the same as plain
calls: `begin`, `wait` when it says so, `end`) and writes only when the claim says the callback is no
duplicate; the block's end tells the claim how the write went. This is an
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
from collections.abc import Callable
from types import TracebackType

from bridge.errors import DeliveryTimeout, Unavailable
from bridge.ingest.metrics import Call
from bridge.ingest.outcomes import Outcome, Outcomes
from bridge.kafka.publisher import Publisher
from bridge.tencent.envelope import CallbackId, Record


class _Write:
    """One copy's write under way, which later copies wait for."""

    __slots__ = ("confirmed", "done", "failure", "followers", "settled")

    def __init__(self) -> None:
        self.done = False
        self.settled: asyncio.Event | None = None
        """Made by the first copy that waits: nearly every write has none, and an Event costs."""
        self.confirmed = False
        self.failure: BaseException | None = None
        self.followers = 0
        """Copies answered ambiguous while this write went on: each ends as this write's record ends."""

    async def wait(self) -> None:
        if self.done:
            return
        if self.settled is None:
            self.settled = asyncio.Event()
        await self.settled.wait()

    def settle(self) -> None:
        self.done = True
        if self.settled is not None:
            self.settled.set()


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

    def claim(self, callback_id: CallbackId, deadline: float) -> Claim:
        """The claim on writing `callback_id`, held with `async with`; `deadline` is on the event loop's
        clock.

        Entering it waits for an earlier copy's write still under way (until `deadline`: then it raises an
        ambiguous `DeliveryTimeout`). The claim then says `duplicate` when the callback was confirmed, within
        the window or by that earlier write: nothing is to be written. Otherwise the holder writes, and the
        block ending without an exception is the write confirmed; with one, the write failed with it.
        """
        return Claim(self, callback_id, deadline)

    def _follow(self, write: _Write) -> None:
        """A copy of `write` stopped waiting: its record is that write's; count how it ends."""
        if write.done:
            self._settle_followers(write, 1)  # it ended in the same turn
        else:
            write.followers += 1

    def _settle_followers(self, write: _Write, count: int) -> None:
        outcomes = self._outcomes
        if outcomes is None:
            return

        def ended(landed: bool) -> None:
            for _ in range(count):
                outcomes.ambiguous_ended(landed)

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

    def remember(self, callback_id: CallbackId) -> None:
        """Remember `callback_id` as confirmed now, for the window, within the bounds."""
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


class Claim:
    """One copy's claim on writing its callback (see `EdgeDedup.claim`)."""

    __slots__ = ("_callback_id", "_deadline", "_dedup", "_write", "duplicate")

    def __init__(self, dedup: EdgeDedup, callback_id: CallbackId, deadline: float) -> None:
        self._dedup = dedup
        self._callback_id = callback_id
        self._deadline = deadline
        self._write: _Write | None = None
        self.duplicate: Outcome | None = None
        """DUPLICATE_CONFIRMED or DUPLICATE_IN_FLIGHT when the callback is confirmed already; None when
        this copy writes it."""

    @property
    def outcome(self) -> Outcome:
        """What the copy's 200 says: its own write confirmed, or which kind of duplicate it is."""
        return Outcome.CONFIRMED if self.duplicate is None else self.duplicate

    def begin(self) -> bool:
        """The claim without waiting, as plain calls on the request path (`async with` costs two coroutines
        more per callback): True once decided (`duplicate`, or this copy writes and then calls `end`); False
        when an identical callback's write is under way, to be waited for with `wait`."""
        dedup, callback_id = self._dedup, self._callback_id
        if dedup._confirmed_recently(callback_id):
            self.duplicate = Outcome.DUPLICATE_CONFIRMED
            return True
        if callback_id in dedup._writing:
            return False
        self._write = dedup._writing[callback_id] = _Write()
        return True

    async def wait(self) -> None:
        """After `begin` said False: wait for the earlier copies' writes (until the deadline: then an
        ambiguous `DeliveryTimeout`), then decide as `begin` does."""
        dedup, callback_id = self._dedup, self._callback_id
        while (earlier := dedup._writing.get(callback_id)) is not None:
            try:
                async with asyncio.timeout_at(self._deadline):
                    await earlier.wait()
            except TimeoutError:
                dedup._follow(earlier)
                raise DeliveryTimeout(
                    "an identical callback is still waiting for Kafka's confirmation; this copy is not "
                    "acknowledged",
                    ambiguous=True,
                ) from None
            except asyncio.CancelledError:
                dedup._follow(earlier)
                raise
            if earlier.confirmed:
                self.duplicate = Outcome.DUPLICATE_IN_FLIGHT
                return
            # The earlier write failed: this copy tries for itself, unless another copy already does.
        self._write = dedup._writing[callback_id] = _Write()

    def end(self, failure: BaseException | None) -> None:
        """This copy's write is over: confirmed (`failure` None) or failed with `failure`. Nothing to do for
        a duplicate."""
        write = self._write
        if write is None:
            return
        dedup = self._dedup
        if failure is None:
            write.confirmed = True
            dedup.remember(self._callback_id)
        else:
            write.failure = failure
        write.settle()
        del dedup._writing[self._callback_id]
        if write.followers:
            dedup._settle_followers(write, write.followers)

    async def __aenter__(self) -> Claim:
        if not self.begin():
            await self.wait()
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        failure: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.end(failure)


async def write_once(
    call: Call,
    dedup: EdgeDedup,
    publisher: Publisher,
    record: Record,
    *,
    identity: CallbackId,
    deadline: float,
) -> Outcome:
    """`record` of the callback `identity` written once, however many copies of it come: the claim
    held around the publish, as plain calls (`async with` costs two coroutines more per callback). The
    outcome its 200 says (confirmed, or which duplicate); raises the write's failure, or the wait's. The
    write's acknowledgement is left in `call`, for the metrics."""
    claim = dedup.claim(identity, deadline)
    if not claim.begin():
        await claim.wait()  # an identical callback's write is under way
    if claim.duplicate is None:
        try:
            started = time.perf_counter()
            await publisher.publish(record, deadline)
            call.published(record, time.perf_counter() - started)
        except BaseException as failure:
            claim.end(failure)
            raise
        claim.end(None)
    return claim.outcome
