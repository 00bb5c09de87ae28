"""Tencent's own sample callbacks, shipped with the package: the seed `bridge dev` prints a curl for and the
load generator sends when no other mix is asked for.

Each file in `samples/` is one callback as Tencent posts it, `{"query": {...}, "body": {...}}`, the body
taken from Tencent's documentation page for the command with its comments stripped.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson


def sample(command: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The query and body of Tencent's sample callback for `command`."""
    raw = resources.files(__package__).joinpath("samples", f"{command}.json").read_bytes()
    loaded = orjson.loads(raw)
    return dict(loaded["query"]), dict(loaded["body"])


SEED_QUERY, SEED_CALLBACK = sample("OfficialAccount.CallbackAfterSendMsg")
"""Tencent's `OfficialAccount.CallbackAfterSendMsg` sample: the callback of the quick start."""
