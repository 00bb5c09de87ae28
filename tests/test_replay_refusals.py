"""`bridge replay` when the destination refuses: a refusal of every record stops the replay with the
checkpoint before it, a refusal of one record sets that record aside in a file it can be re-sent from."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import stat
import subprocess
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, TopicAuthorizationFailedError
from yarl import URL

from bridge.readback.replay import Replay
from bridge.readback.sinks import TopicSink, UrlSink
from bridge.settings import ReplaySettings, ServeSettings
from tests.support.readback import Posted, Receiver
from tests.support.records import create_topic, read_records
from tests.support.serve import run_bridge
from tests.support.settings import reading

README = (Path(__file__).parent.parent / "README.md").read_text()


def body_bytes(posted: Posted) -> bytes:
    return orjson.dumps(posted.body)  # what the bridge was posted, so what the envelope holds


async def run(settings: ReplaySettings, sink: UrlSink | TopicSink) -> tuple[Replay, str]:
    report = io.StringIO()
    replay = Replay(settings, sink, report=report)
    async with asyncio.timeout(60):
        await replay.run()
    return replay, report.getvalue()


def checkpointed(path: Path) -> dict[str, int]:
    positions: dict[str, int] = orjson.loads(path.read_bytes())["positions"]
    return positions


@pytest.mark.parametrize("status", [302, 401, 403, 404, 405])
async def test_a_destination_refusing_every_record_stops_the_replay_and_the_next_run_copies_them_all(
    status: int,
    posted: list[Posted],
    settings: ServeSettings,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """The issue's two runs: a wrong token (401, 403), path (404, 405) or a redirect copies nothing and
    moves no checkpoint; once the receiver is fixed, the same command copies every record (on main: run 1
    "failed" each record for good and moved the checkpoint past it, run 2 copied 0)."""
    receiver.status = status
    url = receiver.url()
    checkpoint = tmp_path / "replay.ckpt"
    window = reading(ReplaySettings, settings, to_url=url, concurrency=4, checkpoint=str(checkpoint))

    first, _ = await run(window, UrlSink(url))
    assert first.failure is not None
    assert f"HTTP {status}" in first.failure
    assert first.tally.copied == 0
    assert (receiver.received, receiver.redirected_gets) == ([], 0)
    assert set(checkpointed(checkpoint).values()) <= {0}

    receiver.status = 200
    second, _ = await run(window, UrlSink(url))
    assert second.failure is None
    assert second.tally.copied == len(posted)
    assert Counter(body for _, body in receiver.received) == Counter(body_bytes(p) for p in posted)


@pytest.mark.parametrize(("path", "status"), [("/wrong", 404), ("/get-only", 405)])
async def test_replay_to_a_wrong_path_exits_1_with_one_line_saying_so_and_keeps_its_checkpoint(
    path: str,
    status: int,
    posted: list[Posted],
    settings: ServeSettings,
    kafka: str,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    url = receiver.url(path)
    result = await asyncio.to_thread(
        run_bridge, "replay", "--bootstrap-servers", kafka, "--topic", settings.topic, "--to-url", url,
        "--checkpoint", "replay.ckpt", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    summary, error = result.stderr.strip().splitlines()[-2:]
    assert re.fullmatch(r"replay: copied 0, .*", summary)
    assert re.fullmatch(
        rf"bridge replay: stopped: \S+@\d+: POST {re.escape(url)}: HTTP {status}; fix that and run the same "
        r"command: --checkpoint replay.ckpt continues here",
        error,
    )
    assert set(checkpointed(tmp_path / "replay.ckpt").values()) <= {0}
    assert not (tmp_path / "replay-skipped.jsonl").exists()


def resend_loop() -> str:
    """The README's loop that re-sends a skipped file."""
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL)
    return next(block for block in blocks if "replay-skipped.jsonl" in block and "curl" in block)


async def test_records_refused_one_by_one_are_set_aside_named_in_the_summary_and_re_sent_by_the_readme(
    posted: list[Posted],
    settings: ServeSettings,
    kafka: str,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """A 400, a 413 and a 422 each refuse one record: the replay goes on, the three are written to the
    skipped file (0600) and the checkpoint passes them; the README's loop re-sends them."""
    once = [p for p, n in Counter(body_bytes(p) for p in posted).items() if n == 1]
    refused = {once[3]: 400, once[17]: 413, once[30]: 422}
    receiver.refuse = dict(refused)
    url = receiver.url()
    command = ("replay", "--bootstrap-servers", kafka, "--topic", settings.topic, "--to-url", url)
    result = await asyncio.to_thread(
        run_bridge, *command, "--checkpoint", "replay.ckpt", "--concurrency", "4", cwd=tmp_path
    )

    assert result.returncode == 1, result.stderr  # errors, reported
    lines = result.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"replay: copied {len(posted) - 3}, skipped as duplicates 0, filtered out 0, errors 3 in .*; "
        r"3 records refused, set aside in replay-skipped.jsonl",
        lines[-1],
    )
    for status in (400, 413, 422):
        assert any(
            re.fullmatch(
                rf"replay: \S+@\d+: refused, set aside in replay-skipped.jsonl: .*: HTTP {status}", line
            )
            for line in lines
        ), result.stderr
    skipped = tmp_path / "replay-skipped.jsonl"
    assert stat.S_IMODE(skipped.stat().st_mode) == 0o600
    envelopes = [orjson.loads(line) for line in skipped.read_bytes().splitlines()]
    assert Counter(orjson.dumps(e["callback"]) for e in envelopes) == Counter(refused.keys())
    assert Counter(body for _, body in receiver.received) == Counter(
        body_bytes(p) for p in posted if body_bytes(p) not in refused
    )

    again = await asyncio.to_thread(run_bridge, *command, "--checkpoint", "replay.ckpt", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "replay: copied 0, " in again.stderr  # the checkpoint is past the records set aside

    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.skip("the README's re-send loop needs jq and curl")
    receiver.received.clear()
    receiver.refuse.clear()
    loop = resend_loop().replace("http://receiver:8080/callback", url)
    resent = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", loop],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert resent.returncode == 0, resent.stderr
    # jq re-serializes the bodies: compact ones, as these are, come out byte for byte.
    assert Counter(body for _, body in receiver.received) == Counter(refused.keys())
    for query, body in receiver.received:
        assert query == next(p.query for p in posted if body_bytes(p) == body)


async def destination_topic(kafka: str, settings: ServeSettings) -> str:
    destination = f"{settings.topic}.copy"
    await create_topic(kafka, destination, 3)
    return destination


def refusing(error: KafkaError, *, only: bytes | None = None) -> type[AIOKafkaProducer]:
    """A producer that gets `error` from the broker for every record, or only for `only`'s."""

    class Refused(AIOKafkaProducer):  # type: ignore[misc]  # aiokafka ships no type information
        async def send_and_wait(self, topic: str, value: bytes, **options: object) -> object:
            if only is None or orjson.loads(value)["callback"] == orjson.loads(only):
                raise error
            return await super().send_and_wait(topic, value, **options)

    return Refused


async def test_a_topic_refusing_authorization_stops_the_replay_instead_of_skipping_every_record(
    posted: list[Posted], settings: ServeSettings, kafka: str, tmp_path: Path
) -> None:
    destination = await destination_topic(kafka, settings)
    checkpoint = tmp_path / "replay.ckpt"
    window = reading(
        ReplaySettings,
        settings,
        to_topic=destination,
        checkpoint=str(checkpoint),
        skipped=str(tmp_path / "s"),
    )
    denied = TopicAuthorizationFailedError(destination)

    first, _ = await run(window, TopicSink(window, destination, producer_class=refusing(denied)))
    assert first.failure is not None
    assert "TopicAuthorizationFailedError" in first.failure
    assert (first.tally.copied, first.tally.refused) == (0, 0)
    assert set(checkpointed(checkpoint).values()) <= {0}
    assert not (tmp_path / "s").exists()

    second, _ = await run(window, TopicSink(window, destination))  # access granted
    assert second.tally.copied == len(posted)
    assert len(await read_records(kafka, [destination], expect=len(posted))) == len(posted)


async def test_a_record_too_large_for_the_topic_is_set_aside_and_the_others_are_copied(
    posted: list[Posted], settings: ServeSettings, kafka: str, tmp_path: Path
) -> None:
    destination = await destination_topic(kafka, settings)
    skipped = tmp_path / "skipped.jsonl"
    window = reading(ReplaySettings, settings, to_topic=destination, skipped=str(skipped))
    large = body_bytes(posted[5])
    sink = TopicSink(window, destination, producer_class=refusing(MessageSizeTooLargeError(), only=large))

    replay, report = await run(window, sink)
    assert replay.failure is None
    assert (replay.tally.copied, replay.tally.refused, replay.tally.errors) == (len(posted) - 1, 1, 1)
    assert f"refused, set aside in {skipped}: the broker refused the write: MessageSizeTooLarge" in report
    set_aside = [orjson.loads(line)["callback"] for line in skipped.read_bytes().splitlines()]
    assert [orjson.dumps(callback) for callback in set_aside] == [large]
    copies = await read_records(kafka, [destination], expect=len(posted) - 1)
    assert len(copies) == len(posted) - 1


async def test_a_stopped_replay_names_its_url_without_the_password_in_it(
    posted: list[Posted], settings: ServeSettings, receiver: Receiver
) -> None:
    receiver.status = 401
    url = str(URL(receiver.url()).with_user("replayer").with_password("s3cret-pass"))
    replay, report = await run(reading(ReplaySettings, settings, to_url=url), UrlSink(url))
    assert replay.failure is not None
    assert "replayer:********@" in replay.failure
    assert "s3cret-pass" not in replay.failure + report
