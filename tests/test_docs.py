"""The README says what the code does: its commands, its configuration table, its examples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.settings import OPTIONS, Option, default, describe_default
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


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.flag)
def test_the_configuration_tables_give_each_options_environment_and_defaults(option: Option) -> None:
    main = option.commands & {"serve", "dev", "topics"}
    readers = sorted(option.commands & {"consume", "replay"})
    assert main or readers or "bench" in option.commands, option.flag
    if main:
        cells = table_row("## Configuration", option.flag)
        assert cells is not None, f"no README row for {option.flag} in the configuration table"
        assert cells[1] == f"`{option.env}`"
        for cell, command in ((cells[2], "serve"), (cells[3], "dev")):
            expected = describe_default(default(option, command), option.unset) if command in main else "-"
            assert cell == expected, f"{option.flag}: the {command} default"
        assert cells[4] == ("yes" if "topics" in main else "-"), "the `topics ensure` column"
    if readers:
        cells = table_row("### Options of `consume` and `replay`", option.flag)
        assert cells is not None, f"no README row for {option.flag} in the consume and replay table"
        assert cells[1] == f"`{option.env}`"
        assert cells[2] == describe_default(default(option, readers[0]), option.unset)
        assert cells[3] == ", ".join(readers)
    if "bench" in option.commands:
        cells = table_row("### Options of `bench`", option.flag)
        assert cells is not None, f"no README row for {option.flag} in the bench table"
        assert cells[1] == f"`{option.env}`"
        assert cells[2] == describe_default(default(option, "bench"), option.unset)


def test_the_configuration_table_has_a_row_for_each_option_and_no_other() -> None:
    section = README.split("## Configuration", 1)[1].split("\n#", 1)[0]
    flags = re.findall(r"^\| `(--[a-z0-9-]+)`", section, flags=re.MULTILINE)
    assert flags == [option.flag for option in OPTIONS if option.commands & {"serve", "dev", "topics"}]


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
