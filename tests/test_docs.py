"""The README says what the code does: its commands, its configuration table, its examples."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from bridge.settings import COMMANDS, Option, describe_default
from bridge.tencent.partitioner import partition_for

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL)


def test_ci_runs_the_readmes_test_command() -> None:
    test_command = next(block.strip() for block in shell_blocks() if "pytest" in block)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_the_readmes_run_command_starts_bridge_dev_in_a_virtualenv() -> None:
    run_command = next(block.strip() for block in shell_blocks() if "bridge dev" in block)
    assert run_command.startswith("python3 -m venv .venv && ")
    assert run_command.endswith(".venv/bin/bridge dev")


def table_row(heading: str, flag: str) -> list[str] | None:
    """The cells of `flag`'s row in the first table after `heading`."""
    section = README.split(heading, 1)[1].split("\n#", 1)[0]
    row = next((line for line in section.splitlines() if line.startswith(f"| `{flag}`")), None)
    return None if row is None else [cell.strip() for cell in row.strip("|").split("|")]


def table_flags(heading: str) -> list[str]:
    section = README.split(heading, 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `(--[a-z0-9-]+)`", section, flags=re.MULTILINE)


SERVE, DEV, TOPICS = COMMANDS["serve"], COMMANDS["dev"], COMMANDS["topics"]


@pytest.mark.parametrize("option", SERVE.options, ids=lambda option: option.flag)
def test_the_configuration_table_gives_each_options_environment_and_defaults(option: Option) -> None:
    cells = table_row("## Configuration", option.flag)
    assert cells is not None, f"no README row for {option.flag} in the configuration table"
    assert cells[1] == f"`{SERVE.env(option)}`"
    assert cells[2] == describe_default(SERVE.default(option), option.unset), (
        f"{option.flag}: the serve default"
    )
    dev = next((o for o in DEV.options if o.field == option.field), None)
    expected = "-" if dev is None else describe_default(DEV.default(dev), dev.unset)
    assert cells[3] == expected, f"{option.flag}: the dev default"
    in_topics = any(o.field == option.field for o in TOPICS.options)
    assert cells[4] == ("yes" if in_topics else "-"), "the `topics ensure` column"


def test_the_configuration_table_has_a_row_for_each_option_and_no_other() -> None:
    assert table_flags("## Configuration") == [option.flag for option in SERVE.options]
    every = {option.flag for option in SERVE.options}
    assert {option.flag for option in (*DEV.options, *TOPICS.options)} <= every


TOOL_TABLES = {
    "consume": "#### `consume`",
    "replay": "#### `replay`",
    "bench": "### Options of `bench`",
    "schema": "#### Options of `schema`",
}


@pytest.mark.parametrize(
    ("name", "option"),
    [(name, option) for name in TOOL_TABLES for option in COMMANDS[name].options],
    ids=lambda value: value.flag if isinstance(value, Option) else value,
)
def test_each_tools_table_gives_each_options_environment_its_old_name_and_default(
    name: str, option: Option
) -> None:
    command = COMMANDS[name]
    cells = table_row(TOOL_TABLES[name], option.flag)
    assert cells is not None, f"no README row for {option.flag} in the {name} table"
    assert cells[1] == f"`{command.env(option)}`"
    old = command.old_env(option)
    assert cells[2] == ("-" if old is None else f"`{old}`"), f"{option.flag}: the name it replaces"
    assert cells[3] == describe_default(command.default(option), option.unset)


@pytest.mark.parametrize("name", TOOL_TABLES)
def test_each_tools_table_has_a_row_for_each_of_its_options_and_no_other(name: str) -> None:
    assert table_flags(TOOL_TABLES[name]) == [option.flag for option in COMMANDS[name].options]


def test_the_readmes_backfill_is_one_replay_command_of_one_day() -> None:
    backfill = next(block.strip() for block in shell_blocks() if block.startswith("bridge replay"))
    assert "\n" not in backfill
    assert "--since 2024-05-02 --until 2024-05-03" in backfill


def python_example() -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    return next(block for block in blocks if "EventReader" in block)


def test_the_readmes_analytics_job_is_under_30_lines() -> None:
    assert len(python_example().strip().splitlines()) < 30


def test_the_partition_example_is_right() -> None:
    match = re.search(r"`(@TOA#_\w+)` is on partition (\d+) of (\d+)", README)
    assert match is not None
    assert partition_for(match.group(1), int(match.group(3))) == int(match.group(2))


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_within_the_readme_names_one_of_its_headings() -> None:
    prose = re.sub(r"```.*?```", "", README, flags=re.DOTALL)  # a "#" line in a code block is no heading
    seen: Counter[str] = Counter()
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", prose, flags=re.MULTILINE):
        anchor = heading_anchor(heading)
        anchors.add(anchor if not seen[anchor] else f"{anchor}-{seen[anchor]}")  # a repeated one gets -1, -2
        seen[anchor] += 1
    links = re.findall(r"\]\(#([^)]+)\)", prose)
    assert links, "the README links none of its sections: the pattern is wrong"
    assert [link for link in links if link not in anchors] == []
