"""SIGHUP reads `--callback-token-file` again: a token rotation is one signal, no request is dropped, and
SIGHUP no longer stops `bridge serve`.

The end-to-end tests run a real `bridge serve` process against the session's Apache Kafka, with a steady
stream of signed callbacks through the signals; the `Reloader` tests run it in process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import aiokafka
import aiokafka.client
import orjson
import pytest
from aiokafka.errors import KafkaConnectionError
from prometheus_client.parser import text_string_to_metric_families

from bridge.ingest.reload import (
    CALLBACK_TOKEN_FILE,
    FAILED,
    RELOADED,
    SASL_PASSWORD_FILE,
    Reloader,
    reread_sasl_password,
)
from bridge.kafka.security import use_sasl_password
from bridge.secret import CallbackToken, Secret
from bridge.settings import build
from bridge.tencent.signature import SignatureCheck, expected_sign
from bridge.tools.embedded import free_port
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import start_serve, until_ready
from tests.support.settings import unique_settings

SEED = fixture("oa-after-send-text")
OLD, NEW = "old-token-2026-11", "new-token-2026-12"
MISMATCH = 40104
WORKERS = 4


def signed(token: str) -> dict[str, str]:
    request_time = str(int(time.time()))
    return {**SEED.query, "RequestTime": request_time, "Sign": expected_sign(token, request_time)}


def write_atomically(path: Path, text: str) -> None:
    """As Kubernetes updates a mounted secret and as the README says to: aside, then renamed over."""
    aside = path.with_suffix(".new")
    aside.write_text(text)
    os.replace(aside, path)


class Serve:
    """`bridge serve` with a token file and an admin port, against the session's broker."""

    def __init__(self, kafka: str, tmp_path: Path, tokens: str) -> None:
        self.token_file = tmp_path / "tokens"
        self.token_file.write_text(tokens)
        self.names = unique_settings(kafka)
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.log_path = tmp_path / "serve.log"
        self.process: subprocess.Popen[bytes] = start_serve(
            ["--bootstrap-servers", kafka, "--create-topics", "--partitions", "1"],
            self.log_path,
            host="127.0.0.1",
            port=str(self.port),
            admin_port=str(self.admin_port),
            callback_token_file=str(self.token_file),
            topic=self.names.topic,
            rejected_topic=self.names.rejected_topic,
        )

    async def post(self, session: aiohttp.ClientSession, token: str, msg_key: str) -> tuple[int, int]:
        """The status and `ErrorCode` of a callback signed with `token`."""
        body = orjson.dumps({**SEED.body, "MsgKey": msg_key})
        async with session.post(f"{self.url}/callback", params=signed(token), data=body) as response:
            return response.status, orjson.loads(await response.read())["ErrorCode"]

    async def reloads(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """`bridge_secret_reloads_total` of the token file by result, and the tokens in use."""
        async with session.get(f"{self.admin}/metrics") as response:
            text = await response.text()
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "bridge_secret_reloads_total":
                    assert sample.labels["source"] == CALLBACK_TOKEN_FILE
                    found[sample.labels["result"]] = sample.value
                elif sample.name == "bridge_callback_tokens":
                    found["tokens"] = sample.value
        return found

    async def hang_up(self, session: aiohttp.ClientSession, result: str) -> dict[str, float]:
        """SIGHUP, and wait until the reload counted `result` once more; the counts then."""
        before = (await self.reloads(session))[result]
        self.process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while (after := await self.reloads(session))[result] == before:
                await asyncio.sleep(0.02)
        assert after[result] == before + 1
        return after

    def stop(self) -> str:
        """SIGTERM; the log, once the process exited 0."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(30) == 0, self.log_path.read_text()
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@asynccontextmanager
async def serving(
    kafka: str, tmp_path: Path, tokens: str
) -> AsyncIterator[tuple[Serve, aiohttp.ClientSession]]:
    bridge = Serve(kafka, tmp_path, tokens)
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, bridge.admin, timeout=60)
            yield bridge, session
    finally:
        bridge.kill()


class Stream:
    """Callbacks posted back to back by a few workers, each signed with the token of the moment."""

    def __init__(self, bridge: Serve, session: aiohttp.ClientSession) -> None:
        self.bridge, self.session = bridge, session
        self.token = OLD
        self.answers: dict[str, tuple[int, int]] = {}
        self._running = True
        self._tasks = [asyncio.create_task(self._work(n)) for n in range(WORKERS)]

    async def _work(self, worker: int) -> None:
        sent = 0
        while self._running:
            key = f"w{worker}-{sent}"
            self.answers[key] = await self.bridge.post(self.session, self.token, key)
            sent += 1

    async def go_on_for(self, callbacks: int) -> None:
        """Until `callbacks` more have been answered."""
        target = len(self.answers) + callbacks
        async with asyncio.timeout(30):
            while len(self.answers) < target:
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._running = False
        await asyncio.gather(*self._tasks)


async def test_a_rotation_by_sighup_during_a_stream_of_callbacks_drops_none_and_swaps_the_tokens(
    kafka: str, tmp_path: Path
) -> None:
    """OLD -> OLD and NEW -> NEW, one SIGHUP each, while callbacks keep coming: every one is answered 200
    and lands in Kafka; with both listed both are valid; once OLD is removed it is refused; the bridge
    never stopped."""
    async with serving(kafka, tmp_path, f"{OLD}\n") as (bridge, session):
        stream = Stream(bridge, session)
        await stream.go_on_for(40)
        write_atomically(bridge.token_file, f"{OLD}\n{NEW}\n")
        counts = await bridge.hang_up(session, RELOADED)
        assert counts["tokens"] == 2
        await stream.go_on_for(20)
        assert (await bridge.post(session, NEW, "new-while-both"))[0] == 200
        assert (await bridge.post(session, OLD, "old-while-both"))[0] == 200

        stream.token = NEW  # Tencent's console switched
        await stream.go_on_for(40)
        write_atomically(bridge.token_file, f"{NEW}\n")
        counts = await bridge.hang_up(session, RELOADED)
        assert counts == {RELOADED: 2, FAILED: 0, "tokens": 1}
        await stream.go_on_for(40)
        await stream.stop()

        assert await bridge.post(session, OLD, "old-after") == (401, MISMATCH)
        assert (await bridge.post(session, NEW, "new-after"))[0] == 200
        assert bridge.process.poll() is None, "SIGHUP stopped the bridge"
        log = bridge.stop()  # the signals were no stop: the SIGTERM after them is

    failed = {key: answer for key, answer in stream.answers.items() if answer[0] != 200}
    assert not failed, failed
    assert len(stream.answers) >= 140
    confirmed = {*stream.answers, "new-while-both", "old-while-both", "new-after"}
    records = await read_records(kafka, [bridge.names.topic], expect=len(confirmed))
    assert {record.key.decode() for record in records if record.key is not None} == confirmed
    assert log.count("SIGHUP: callback_token_file reloaded") == 2
    assert OLD not in log
    assert NEW not in log


async def test_a_token_file_that_cannot_be_used_keeps_the_old_tokens_says_why_and_is_counted(
    kafka: str, tmp_path: Path
) -> None:
    """Empty, only blank lines, deleted, a placeholder, a bad APPID=: each SIGHUP keeps the tokens in use,
    logs one error naming the file, and counts a failure; a good file then is read as usual."""
    async with serving(kafka, tmp_path, f"{OLD}\n") as (bridge, session):
        bad_contents: list[str | None] = ["", "\n \n", None, "change-me\n", f"{NEW}\n1400000001=\n"]
        for number, content in enumerate(bad_contents, start=1):
            if content is None:
                bridge.token_file.unlink()
            else:
                write_atomically(bridge.token_file, content)
            counts = await bridge.hang_up(session, FAILED)
            assert counts == {RELOADED: 0, FAILED: number, "tokens": 1}, content
            assert (await bridge.post(session, OLD, f"old-{number}"))[0] == 200, content
            assert (await bridge.post(session, NEW, f"new-{number}")) == (401, MISMATCH), content

        write_atomically(bridge.token_file, f"{NEW}\n")
        await bridge.hang_up(session, RELOADED)
        assert (await bridge.post(session, NEW, "new-good"))[0] == 200
        assert await bridge.post(session, OLD, "old-gone") == (401, MISMATCH)
        log = bridge.stop()
    errors = [line for line in log.splitlines() if "not reloaded, the old value stays in use" in line]
    assert len(errors) == len(bad_contents)
    assert all(str(bridge.token_file) in line for line in errors)
    assert "holds no token" in errors[0]
    assert "No such file" in errors[2]
    assert "placeholder" in errors[3]
    assert "line 2" in errors[4]
    assert NEW not in log
    assert OLD not in log


def test_sighup_with_tokens_given_directly_says_there_is_nothing_to_reload_and_keeps_serving(
    tmp_path: Path,
) -> None:
    """A token by flag cannot change: SIGHUP says so, the bridge keeps serving and checking it. (No broker
    is needed: a wrong signature is refused before Kafka.)"""
    port = free_port()
    log_path = tmp_path / "serve.log"
    process = start_serve(
        ["--bootstrap-servers", "127.0.0.1:1"], log_path, host="127.0.0.1", port=str(port), callback_token=OLD
    )
    try:
        with _answering(f"http://127.0.0.1:{port}/healthz", process):
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "SIGHUP: nothing to reload" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            assert process.poll() is None, "SIGHUP stopped the bridge"
            status, code = asyncio.run(_post_signed(f"http://127.0.0.1:{port}", NEW))
            assert (status, code) == (401, MISMATCH)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "--callback-token-file" in log_path.read_text()
    assert OLD not in log_path.read_text()


@contextmanager
def _answering(url: str, process: subprocess.Popen[bytes]) -> Iterator[None]:
    async def wait() -> None:
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                assert process.poll() is None
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)

    asyncio.run(wait())
    yield


async def _post_signed(url: str, token: str) -> tuple[int, int]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/callback", params=signed(token), data=SEED.raw_body) as response,
    ):
        return response.status, orjson.loads(await response.read())["ErrorCode"]


# --- the reloader, in process ------------------------------------------------------------------------------


def test_the_reloader_keeps_flag_tokens_beside_the_files_new_ones(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OLD}\n")
    settings = build(
        "serve",
        {"callback_token": (CallbackToken("from-flag"),)},
        {"BRIDGE_CALLBACK_TOKEN_FILE": str(token_file)},
    )
    check = SignatureCheck(settings.callback_tokens, 60.0)
    reloader = Reloader(settings, check)
    write_atomically(token_file, f"{NEW}\n1400000001={OLD}\n")
    reloader.reload()
    assert [(token.reveal(), getattr(token, "sdk_app_id", None)) for token in check.tokens] == [
        ("from-flag", None),
        (NEW, None),
        (OLD, "1400000001"),
    ]
    assert reloader.counts == {(CALLBACK_TOKEN_FILE, RELOADED): 1, (CALLBACK_TOKEN_FILE, FAILED): 0}
    assert reloader.tokens_in_use == 3


def test_a_failing_reload_changes_no_token_and_logs_no_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OLD}\n")
    settings = build("serve", {}, {"BRIDGE_CALLBACK_TOKEN_FILE": str(token_file)})
    check = SignatureCheck(settings.callback_tokens, 60.0)
    reloader = Reloader(settings, check)
    before = check.tokens
    write_atomically(token_file, f"{NEW}\nchange-me\n")
    with caplog.at_level(logging.INFO, logger="bridge.reload"):
        reloader.reload()
    assert check.tokens is before
    assert reloader.counts[CALLBACK_TOKEN_FILE, FAILED] == 1
    (line,) = caplog.records
    assert line.levelno == logging.ERROR
    assert str(token_file) in line.getMessage()
    assert NEW not in caplog.text
    assert OLD not in caplog.text


def test_another_source_joins_the_reload_and_its_failure_is_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hook forward mode's URL credentials use: a failing source does not stop the token file's."""
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OLD}\n")
    settings = build("serve", {}, {"BRIDGE_CALLBACK_TOKEN_FILE": str(token_file)})
    check = SignatureCheck(settings.callback_tokens, 60.0)
    reloader = Reloader(settings, check)

    def broken() -> str:
        raise ValueError("--forward-url credentials: cannot read the file")

    reloader.add("forward_url", broken)
    write_atomically(token_file, f"{NEW}\n")
    with caplog.at_level(logging.INFO, logger="bridge.reload"):
        reloader.reload()
    assert [token.reveal() for token in check.tokens] == [NEW]
    assert reloader.counts == {
        (CALLBACK_TOKEN_FILE, RELOADED): 1,
        (CALLBACK_TOKEN_FILE, FAILED): 0,
        ("forward_url", RELOADED): 0,
        ("forward_url", FAILED): 1,
    }
    assert "forward_url not reloaded" in caplog.text


def test_a_reload_with_no_file_says_so_and_counts_nothing(caplog: pytest.LogCaptureFixture) -> None:
    settings = build("serve", {"callback_token": (Secret(OLD),)}, {})
    reloader = Reloader(settings, SignatureCheck(settings.callback_tokens, 60.0))
    with caplog.at_level(logging.INFO, logger="bridge.reload"):
        reloader.reload()
    assert "nothing to reload" in caplog.text
    assert "--callback-token" in caplog.text
    assert reloader.counts == {}


def test_a_signature_check_refuses_an_empty_token_set() -> None:
    check = SignatureCheck((Secret(OLD),), 60.0)
    with pytest.raises(ValueError, match="at least one token"):
        check.replace_tokens(())
    assert [token.reveal() for token in check.tokens] == [OLD]


# --- the poll of --reload-interval, and the SASL password file -------------------------------------------


def _polled(token_file: Path) -> tuple[Reloader, SignatureCheck]:
    settings = build(
        "serve", {}, {"BRIDGE_CALLBACK_TOKEN_FILE": str(token_file), "BRIDGE_RELOAD_INTERVAL": "0.05"}
    )
    check = SignatureCheck(settings.callback_tokens, 60.0)
    return Reloader(settings, check), check


def test_the_poll_reads_a_file_again_only_once_its_content_changed(tmp_path: Path) -> None:
    """Unchanged: nothing read; rewritten in place with a token of the same length, within the same clock
    tick: read once; looked at again: nothing more."""
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OLD}\n")
    reloader, check = _polled(token_file)
    assert reloader.reload_changed() == []
    assert reloader.counts[CALLBACK_TOKEN_FILE, RELOADED] == 0
    same_length = OLD.replace("old", "odd")
    token_file.write_text(f"{same_length}\n")  # in place: same inode, same size
    assert reloader.reload_changed() == [CALLBACK_TOKEN_FILE]
    assert [token.reveal() for token in check.tokens] == [same_length]
    assert reloader.reload_changed() == []
    assert reloader.counts == {(CALLBACK_TOKEN_FILE, RELOADED): 1, (CALLBACK_TOKEN_FILE, FAILED): 0}


def test_the_poll_follows_a_kubernetes_swap_of_the_data_link(tmp_path: Path) -> None:
    """A Secret volume: `tokens -> ..data/tokens`, `..data -> ..<time>`; the kubelet writes a new folder and
    renames a new `..data` link over the old one. The path's own link never changes; the file behind it
    does, and the poll reads it."""
    volume = tmp_path / "secret"
    first = volume / "..2026_11_30_10_00_00.1"
    first.mkdir(parents=True)
    (first / "tokens").write_text(f"{OLD}\n")
    (volume / "..data").symlink_to(first.name)
    (volume / "tokens").symlink_to("..data/tokens")
    reloader, check = _polled(volume / "tokens")
    assert reloader.reload_changed() == []

    second = volume / "..2026_12_01_10_00_00.2"
    second.mkdir()
    (second / "tokens").write_text(f"{NEW}\n")
    (volume / "..data_tmp").symlink_to(second.name)
    os.replace(volume / "..data_tmp", volume / "..data")
    assert reloader.reload_changed() == [CALLBACK_TOKEN_FILE]
    assert [token.reveal() for token in check.tokens] == [NEW]
    assert reloader.reload_changed() == []


def test_the_poll_counts_a_bad_file_once_and_reads_it_again_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An emptied file is one failure, not one per look; the tokens stay; the next good content is read."""
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OLD}\n")
    reloader, check = _polled(token_file)
    write_atomically(token_file, "")
    with caplog.at_level(logging.INFO, logger="bridge.reload"):
        assert reloader.reload_changed() == [CALLBACK_TOKEN_FILE]
        assert reloader.reload_changed() == []
    assert [token.reveal() for token in check.tokens] == [OLD]
    assert reloader.counts[CALLBACK_TOKEN_FILE, FAILED] == 1
    assert "the file changed (--reload-interval): callback_token_file not reloaded" in caplog.text
    write_atomically(token_file, f"{NEW}\n")
    assert reloader.reload_changed() == [CALLBACK_TOKEN_FILE]
    assert [token.reveal() for token in check.tokens] == [NEW]
    assert reloader.counts == {(CALLBACK_TOKEN_FILE, RELOADED): 1, (CALLBACK_TOKEN_FILE, FAILED): 1}


def test_a_sighup_reads_the_file_so_the_poll_does_not_read_it_again(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OLD}\n")
    reloader, _ = _polled(token_file)
    write_atomically(token_file, f"{NEW}\n")
    reloader.reload()
    assert reloader.reload_changed() == []
    assert reloader.counts[CALLBACK_TOKEN_FILE, RELOADED] == 1


async def test_the_polling_context_reads_a_changed_file_while_the_app_runs_and_stops_with_it(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OLD}\n")
    reloader, check = _polled(token_file)
    polling = reloader.polling(None)
    await anext(polling)
    write_atomically(token_file, f"{NEW}\n")
    async with asyncio.timeout(5):
        while reloader.counts[CALLBACK_TOKEN_FILE, RELOADED] == 0:
            await asyncio.sleep(0.01)
    assert [token.reveal() for token in check.tokens] == [NEW]
    with pytest.raises(StopAsyncIteration):
        await anext(polling)
    write_atomically(token_file, f"{OLD}\n")
    await asyncio.sleep(0.2)  # stopped: four intervals, and nothing read
    assert reloader.counts[CALLBACK_TOKEN_FILE, RELOADED] == 1


async def test_without_an_interval_only_sighup_reads_the_files(tmp_path: Path) -> None:
    """--reload-interval 0, the default: the polling context starts no poll."""
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OLD}\n")
    settings = build("serve", {}, {"BRIDGE_CALLBACK_TOKEN_FILE": str(token_file)})
    assert settings.reload_interval == 0
    reloader = Reloader(settings, SignatureCheck(settings.callback_tokens, 60.0))
    polling = reloader.polling(None)
    await anext(polling)
    write_atomically(token_file, f"{NEW}\n")
    await asyncio.sleep(0.2)
    assert reloader.counts[CALLBACK_TOKEN_FILE, RELOADED] == 0
    with pytest.raises(StopAsyncIteration):
        await anext(polling)


async def test_a_new_sasl_password_goes_to_the_connections_aiokafkas_client_opens_from_then_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`use_sasl_password` sets what aiokafka 0.14's client passes to `create_conn`: a guard against an
    aiokafka that keeps the password elsewhere (the rotation tests against Kafka would then get 503)."""
    passwords: list[str] = []

    async def create_conn(*_args: object, **kwargs: object) -> None:
        passwords.append(str(kwargs["sasl_plain_password"]))
        raise OSError("no broker here")

    monkeypatch.setattr(aiokafka.client, "create_conn", create_conn)
    client = aiokafka.AIOKafkaClient(
        bootstrap_servers="127.0.0.1:1",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_plain_username="bridge",
        sasl_plain_password="first-Pa55",  # noqa: S106 - a test value, never sent
    )
    with pytest.raises(KafkaConnectionError):
        await client.bootstrap()
    use_sasl_password(client, "second-Pa55")
    with pytest.raises(KafkaConnectionError):
        await client.bootstrap()
    await client.close()
    assert passwords == ["first-Pa55", "second-Pa55"]


class _PasswordUser:
    def __init__(self) -> None:
        self.passwords: list[str] = []

    def use_sasl_password(self, password: Secret) -> None:
        self.passwords.append(password.reveal())


def test_the_sasl_password_file_read_again_goes_to_the_publisher_and_a_bad_one_does_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A good file: its password (without the final line break) is put in use; an empty or missing one is
    refused naming the file, never the content, and the publisher is not told."""
    password_file = tmp_path / "kafka-password"
    password_file.write_text("first-Pa55\n")
    settings = build("serve", {"allow_unsigned": True}, {})
    reloader, user = Reloader(settings, None), _PasswordUser()
    reloader.add(SASL_PASSWORD_FILE, reread_sasl_password(str(password_file), user), str(password_file))
    write_atomically(password_file, "second-Pa55\n")
    with caplog.at_level(logging.INFO, logger="bridge.reload"):
        reloader.reload()
        write_atomically(password_file, "")
        reloader.reload()
        password_file.unlink()
        assert reloader.reload_changed() == [SASL_PASSWORD_FILE]
    assert user.passwords == ["second-Pa55"]
    assert reloader.counts == {(SASL_PASSWORD_FILE, RELOADED): 1, (SASL_PASSWORD_FILE, FAILED): 2}
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 2
    assert all(f"--sasl-password-file {password_file}" in line for line in errors)
    assert "the file is empty" in errors[0]
    assert "No such file" in errors[1]
    assert "Pa55" not in caplog.text
