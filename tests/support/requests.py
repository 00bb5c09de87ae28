"""The Tencent callbacks the tests send: one JSON file per callback in `tests/fixtures/`, query and body."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

FIXTURES = Path(__file__).parent.parent / "fixtures"


@dataclass(frozen=True)
class Fixture:
    name: str
    query: dict[str, str]
    body: dict[str, Any]

    @property
    def raw_body(self) -> bytes:
        return orjson.dumps(self.body)


def load_fixtures() -> list[Fixture]:
    fixtures = []
    for path in sorted(FIXTURES.glob("*.json")):
        data = orjson.loads(path.read_bytes())
        fixtures.append(Fixture(name=data["name"], query=data["query"], body=data["body"]))
    return fixtures


def fixture(name: str) -> Fixture:
    return next(f for f in load_fixtures() if f.name == name)
