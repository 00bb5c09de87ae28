"""What every recipe computes, and how it is printed: one type, so the engines' answers compare with `==`.

- **Messages per official account per hour**: the `OfficialAccount.CallbackAfterSendMsg` callbacks, each
  counted once however many copies landed, by `Official_Account` and the UTC hour of the event time
  (`EventTime`, an integer or a decimal string of milliseconds; the receive time when it has none).
- **The duplicate rate**: of all the records read, the share whose callback identity appears more than once.
  A callback's identity is the bridge's (`bridge.tencent.envelope.callback_id`): its `SdkAppid`, its command
  and its key (`MsgKey`; `GroupId:MsgSeq` for `Group.CallbackAfterSendMsg`; the body itself for a callback
  with neither). Two copies of one callback are two duplicated records, and one callback too many.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Answers:
    """The recipes' results. `messages` maps (official account, start of the hour in epoch ms) to the
    number of distinct messages of that account in that hour; hours with none are absent."""

    messages: dict[tuple[str, int], int]
    records: int
    """Records read, every copy counted."""
    callbacks: int
    """Distinct callback identities among them."""
    duplicated_records: int
    """Records whose identity appears more than once."""

    @property
    def duplicate_rate(self) -> float:
        return self.duplicated_records / self.records if self.records else 0.0

    @classmethod
    def of(
        cls, messages: Iterable[tuple[str, int, int]], records: int, callbacks: int, duplicated: int
    ) -> Answers:
        """From the rows an engine returns: (account, hour start in ms, messages) and the three counts. The
        engines give their integers in types of their own (numpy's, Java's longs): each is made an `int`."""
        return cls(
            messages={(str(account), int(hour)): int(count) for account, hour, count in messages},
            records=int(records),
            callbacks=int(callbacks),
            duplicated_records=int(duplicated),
        )

    def report(self) -> str:
        """The answers as a person reads them: one line per account and hour, then the duplicates."""
        lines = ["official_account\thour (UTC)\tmessages"]
        for (account, hour), count in sorted(self.messages.items()):
            start = datetime.fromtimestamp(hour / 1000, UTC).strftime("%Y-%m-%d %H:00")
            lines.append(f"{account}\t{start}\t{count}")
        lines.append(
            f"records {self.records}, callbacks {self.callbacks}, duplicated records "
            f"{self.duplicated_records}, duplicate rate {self.duplicate_rate:.2%}"
        )
        return "\n".join(lines)


def hour_of(event_time_ms: int) -> int:
    """The start of the UTC hour an instant falls in, in epoch ms."""
    return event_time_ms - event_time_ms % HOUR_MS
