"""The schemas shipped in the package, under `bridge/schema/generated/`: a JSON Schema per command, and
every format per topic of the default layout. They are the generators' output, checked by
tests/test_schema.py; after a change to the registry or a generator, write them again with
`python -m bridge.schema.shipped`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from bridge.schema import clickhouse, flink, spark
from bridge.schema.json_schema import json_schema
from bridge.schema.model import by_command, by_topic, topics
from bridge.tencent.commands import COMMANDS

FOLDER = Path(__file__).parent / "generated"


def _json(document: dict[str, Any]) -> str:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"


def expected() -> dict[str, str]:
    """Each shipped file's path (relative to `generated/`) and its content, as the generators make it."""
    files = {f"commands/{name}.schema.json": _json(json_schema(by_command(name))) for name in COMMANDS}
    for topic in topics():
        selection = by_topic(topic)
        files[f"topics/{topic}.schema.json"] = _json(json_schema(selection))
        files[f"topics/{topic}.clickhouse.sql"] = clickhouse.ddl(selection)
        files[f"topics/{topic}.flink.sql"] = flink.ddl(selection)
        files[f"topics/{topic}.spark.json"] = _json(spark.struct_type(selection))
    return files


def command_schema(command: str) -> dict[str, Any]:
    """The shipped JSON Schema of a known command's records."""
    path = resources.files(__package__).joinpath("generated", "commands", f"{command}.schema.json")
    schema: dict[str, Any] = orjson.loads(path.read_bytes())
    return schema


def write(folder: Path = FOLDER) -> list[Path]:
    """Write every shipped file, and remove the ones no generator makes any more."""
    files = expected()
    written = []
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    for stale in folder.glob("*/*"):
        if stale.relative_to(folder).as_posix() not in files:
            stale.unlink()
    return written


if __name__ == "__main__":
    print(f"wrote {len(write())} files under {FOLDER}")
