"""The files `consume` and `replay` write are created 0600, and a checkpoint or a commit reaches the disk
only after the data it covers: data fsynced, then the checkpoint's temporary file fsynced, renamed, and the
directory fsynced."""

from __future__ import annotations

import asyncio
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from bridge.readback.consume import _consume
from bridge.readback.replay import Checkpoint, Replay
from bridge.readback.sinks import FileSink, UrlSink
from bridge.settings import ConsumeSettings, ReplaySettings, ServeSettings
from tests.support.readback import Posted, Receiver
from tests.support.serve import run_bridge
from tests.support.settings import reading

Call = tuple[str, ...]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The common umask 022, under which `open()` creates files 0644, readable by every user."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Every os.fsync (with the path of what it synced), os.replace and group commit, in order."""
    recorded: list[Call] = []
    fsync, os_replace, commit = os.fsync, os.replace, AIOKafkaConsumer.commit

    def recording_fsync(fd: int) -> None:
        recorded.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(source: Any, target: Any) -> None:
        recorded.append(("replace", str(source), str(target)))
        os_replace(source, target)

    async def recording_commit(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> None:
        recorded.append(("commit",))
        await commit(self, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(AIOKafkaConsumer, "commit", recording_commit)
    return recorded


def assert_each_checkpoint_follows_its_data(calls: list[Call], data: Path, checkpoint: Path) -> None:
    """Each replace of the checkpoint: the data file fsynced since the previous one, then the temporary
    file fsynced just before, the directory just after."""
    temporary = f"{checkpoint}.tmp"
    replaces = [i for i, call in enumerate(calls) if call == ("replace", temporary, str(checkpoint))]
    assert replaces, calls
    previous = -1
    for i in replaces:
        assert ("fsync", str(data)) in calls[previous + 1 : i - 1], calls
        assert calls[i - 1] == ("fsync", temporary), calls
        assert calls[i + 1] == ("fsync", str(checkpoint.parent)), calls
        previous = i


async def test_a_replay_to_a_file_creates_it_and_its_checkpoint_0600_and_fsyncs_the_data_first(
    posted: list[Posted], settings: ServeSettings, tmp_path: Path, usual_umask: None, calls: list[Call]
) -> None:
    out, checkpoint = tmp_path / "copy.jsonl", tmp_path / "replay.ckpt"
    window = reading(ReplaySettings, settings, to_file=str(out), checkpoint=str(checkpoint))
    replay = Replay(window, FileSink(str(out)), report=io.StringIO())
    async with asyncio.timeout(60):
        await replay.run()

    assert replay.tally.copied == len(posted)
    assert (mode(out), mode(checkpoint)) == (0o600, 0o600)
    assert_each_checkpoint_follows_its_data(calls, out, checkpoint)


async def test_records_set_aside_are_fsynced_before_the_checkpoint_that_passes_them(
    posted: list[Posted],
    settings: ServeSettings,
    receiver: Receiver,
    tmp_path: Path,
    usual_umask: None,
    calls: list[Call],
) -> None:
    receiver.status = 422
    skipped, checkpoint = tmp_path / "skipped.jsonl", tmp_path / "replay.ckpt"
    window = reading(
        ReplaySettings, settings, to_url=receiver.url(), checkpoint=str(checkpoint), skipped=str(skipped)
    )
    replay = Replay(window, UrlSink(receiver.url()), report=io.StringIO())
    async with asyncio.timeout(60):
        await replay.run()

    assert replay.tally.refused == len(posted)
    assert (mode(skipped), mode(checkpoint)) == (0o600, 0o600)
    assert_each_checkpoint_follows_its_data(calls, skipped, checkpoint)


def test_a_checkpoint_left_0644_by_an_older_version_becomes_0600_at_its_next_save(
    tmp_path: Path, usual_umask: None
) -> None:
    path = tmp_path / "replay.ckpt"
    for old in (path, tmp_path / "replay.ckpt.tmp"):
        old.write_bytes(b"{}")
        old.chmod(0o644)
    Checkpoint(path, {"topic": "t"}).save({0: 5})
    assert mode(path) == 0o600
    assert orjson.loads(path.read_bytes())["positions"] == {"0": 5}


async def test_consume_output_is_created_0600(
    posted: list[Posted], settings: ServeSettings, kafka: str, tmp_path: Path, usual_umask: None
) -> None:
    output = tmp_path / "events.jsonl"
    result = await asyncio.to_thread(
        run_bridge, "consume", "--bootstrap-servers", kafka, "--topic", settings.topic, "--from-beginning",
        "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(output.read_bytes().splitlines()) == len(posted)
    assert mode(output) == 0o600


async def test_consume_with_a_group_fsyncs_its_output_before_each_commit(
    posted: list[Posted], settings: ServeSettings, tmp_path: Path, calls: list[Call]
) -> None:
    output = tmp_path / "events.jsonl"
    with output.open("ab") as file:
        async with asyncio.timeout(60):
            status = await _consume(
                reading(ConsumeSettings, settings, group="durable", from_beginning=True), file
            )
    assert status == 0
    assert len(output.read_bytes().splitlines()) == len(posted)
    commits = [i for i, call in enumerate(calls) if call == ("commit",)]
    assert commits, calls
    previous = -1
    for i in commits:
        assert ("fsync", str(output)) in calls[previous + 1 : i], calls
        previous = i
