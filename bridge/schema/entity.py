"""Which fields a command's owning entity is made of, learnt from the registry's own entity rule.

The registry's rules (`commands.account("Official_Account")`, `account_pair(...)`, `nested_account(...)`,
`first_pair_account(...)`, `app_level`) are functions of the body. Rather than keep a second table that could
drift from them, each rule is run once on probe bodies that answer every lookup with a marker naming the
path looked up, so the rule itself says which paths it reads and how it joins them. The column formats
then compute the same entity from the record value (the `entity` column), with the bridge's fallback to the
app (`SdkAppid`) when the fields are absent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.tencent.commands import EntityRule

Path = tuple[str | int, ...]
_MARKER = re.compile("\x02([^\x03]*)\x03")
# What a probe answers at each depth of a lookup: a string (the field), an object or a list of one object.
_PLANS: tuple[tuple[str, ...], ...] = (("str",), ("dict", "str"), ("list", "str"))


@dataclass(frozen=True, slots=True)
class EntityShape:
    """The paths (into the callback) an entity is made of; `joined` when several, sorted and joined by ':'
    (a conversation). No paths: the app's own, the `SdkAppid`."""

    paths: tuple[Path, ...]

    @property
    def joined(self) -> bool:
        return len(self.paths) > 1


class _Probe(dict[str, Any]):
    """A body whose every field is there, shaped by the plan: what the rule reads is what it names."""

    def __init__(self, path: Path, plan: tuple[str, ...]) -> None:
        super().__init__()
        self._path, self._plan = path, plan

    def _value(self, key: str) -> Any:
        path = (*self._path, key)
        depth = sum(isinstance(step, str) for step in self._path)  # a list's index is no level of its own
        shape = self._plan[min(depth, len(self._plan) - 1)]
        if shape == "dict":
            return _Probe(path, self._plan)
        if shape == "list":
            return [_Probe((*path, 0), self._plan)]
        return "\x02" + json.dumps(list(path)) + "\x03"

    def get(self, key: str, default: Any = None) -> Any:
        return self._value(key)

    def __getitem__(self, key: str) -> Any:
        return self._value(key)

    def __contains__(self, key: object) -> bool:
        return True


def entity_shape(rule: EntityRule | Callable[..., Any]) -> EntityShape:
    """The paths `rule` makes the owning entity of; raises `ValueError` for a rule whose result is not
    made of the fields it read (a new kind of rule the column formats cannot follow)."""
    for plan in _PLANS:
        result = rule(_Probe((), plan))
        if result is None:
            continue
        markers = _MARKER.findall(result)
        if (
            not markers
            or _MARKER.sub("", result).strip(":") != ""
            or (len(markers) > 1 and result.count(":") != 1)
        ):
            raise ValueError(f"the entity rule {rule!r} computes {result!r}, not a field or a sorted pair")
        return EntityShape(tuple(tuple(json.loads(marker)) for marker in sorted(markers)))
    return EntityShape(())
