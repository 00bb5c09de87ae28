"""The README says what the code does: its commands, its configuration table, its examples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.partitioner import partition_for
from bridge.settings import OPTIONS, Option, default, describe_default

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


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.flag)
def test_the_configuration_table_gives_each_options_environment_and_defaults(option: Option) -> None:
    row = next((line for line in README.splitlines() if line.startswith(f"| `{option.flag}`")), None)
    assert row is not None, f"no README row for {option.flag}"
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == f"`{option.env}`"
    assert cells[2] == describe_default(default(option, "serve"))
    assert cells[3] == (describe_default(default(option, "dev")) if "dev" in option.commands else "-")
    assert cells[4] == ("yes" if "topics" in option.commands else "-"), "the `topics ensure` column"


def test_the_configuration_table_has_a_row_for_each_option_and_no_other() -> None:
    flags = re.findall(r"^\| `(--[a-z0-9-]+)`", README, flags=re.MULTILINE)
    assert flags == [option.flag for option in OPTIONS]


def test_the_partition_example_is_right() -> None:
    match = re.search(r"`(@TOA#_\w+)` is on partition (\d+) of (\d+)", README)
    assert match is not None
    assert partition_for(match.group(1), int(match.group(3))) == int(match.group(2))
