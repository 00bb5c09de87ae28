"""Kafka TLS and SASL settings become the same aiokafka arguments for every client, and bad ones fail early.

These tests check the mapping and the refusals at start, with no broker; tests/test_kafka_security_real.py
connects every command through SASL and TLS listeners of a real Apache Kafka.
"""

from __future__ import annotations

import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiokafka.helpers
import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed, UnsupportedSaslMechanismError

from bridge.cli import main
from bridge.kafka import security as kafka_security
from bridge.kafka.producer import new_producer
from bridge.kafka.topics import admin_client
from bridge.readback.sinks import TopicSink
from bridge.secret import Secret
from bridge.settings import ConsumeSettings, ReplaySettings, ServeSettings, SettingsError, build
from tests.support.settings import reading

SERVERS = {"BRIDGE_BOOTSTRAP_SERVERS": "kafka:9093"}


def test_by_default_the_connection_is_plaintext_without_tls_or_sasl() -> None:
    assert ServeSettings().client_options() == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_settings_become_aiokafkas_sasl_arguments(mechanism: str) -> None:
    env = {
        **SERVERS,
        "BRIDGE_SECURITY_PROTOCOL": "sasl_plaintext",
        "BRIDGE_SASL_MECHANISM": mechanism.lower(),
        "BRIDGE_SASL_USERNAME": "bridge",
        "BRIDGE_SASL_PASSWORD": "s3cret pass",
    }
    assert build("serve", {}, env).client_options() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "bridge",
        "sasl_plain_password": "s3cret pass",
    }


def test_the_sasl_password_can_come_from_a_file_without_its_final_line_break(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(" pass word \n")
    env = {
        **SERVERS,
        "BRIDGE_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "BRIDGE_SASL_MECHANISM": "PLAIN",
        "BRIDGE_SASL_USERNAME": "bridge",
        "BRIDGE_SASL_PASSWORD_FILE": str(secret_file),
    }
    password = build("serve", {}, env).client_options()["sasl_plain_password"]
    assert password == " pass word "  # noqa: S105 - the test's own password


def test_tls_settings_become_a_verifying_ssl_context_built_from_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("PEM")
    given: dict[str, Any] = {}

    def fake_context(**kwargs: Any) -> ssl.SSLContext:
        given.update(kwargs)
        return ssl.create_default_context()

    monkeypatch.setattr(aiokafka.helpers, "create_ssl_context", fake_context)  # loaded where it is used
    env = {
        **SERVERS,
        "BRIDGE_SECURITY_PROTOCOL": "SASL_SSL",
        "BRIDGE_SSL_CAFILE": str(files["ca"]),
        "BRIDGE_SSL_CERTFILE": str(files["cert"]),
        "BRIDGE_SSL_KEYFILE": str(files["key"]),
        "BRIDGE_SASL_MECHANISM": "SCRAM-SHA-512",
        "BRIDGE_SASL_USERNAME": "bridge",
        "BRIDGE_SASL_PASSWORD": "pw",
    }
    options = build("topics", {}, env).client_options()
    assert given == {"cafile": str(files["ca"]), "certfile": str(files["cert"]), "keyfile": str(files["key"])}
    assert options["security_protocol"] == "SASL_SSL"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"


def test_tls_without_a_ca_file_verifies_brokers_against_the_systems_cas() -> None:
    context = ServeSettings(security_protocol="SSL").client_options()["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_a_missing_ca_file_is_refused_at_start_naming_the_variable_and_the_file() -> None:
    env = {**SERVERS, "BRIDGE_SECURITY_PROTOCOL": "SSL", "BRIDGE_SSL_CAFILE": "/nonexistent/ca.pem"}
    with pytest.raises(
        SettingsError,
        match=r"BRIDGE_SSL_CAFILE='/nonexistent/ca\.pem': cannot read the file /nonexistent/ca\.pem: No such",
    ):
        build("serve", {}, env)


def test_a_ca_file_that_is_not_pem_is_refused_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(SettingsError, match=r"cannot load TLS files \(.*ca\.pem\)"):
        ServeSettings(security_protocol="SSL", ssl_cafile=str(bad)).client_options()


def test_serve_with_a_missing_ca_file_exits_2_saying_so(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--security-protocol", "SSL", "--ssl-cafile", "/nonexistent/ca.pem"], SERVERS)
    assert exit_.value.code == 2
    assert "/nonexistent/ca.pem" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "phrase"),
    [
        (
            ServeSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN"),
            "needs --sasl-username, --sasl-password",
        ),
        (
            ServeSettings(sasl_username="u", sasl_password=Secret("p")),
            "is PLAINTEXT: use SASL_PLAINTEXT or SASL_SSL",
        ),
        (ServeSettings(ssl_cafile="/etc/hosts"), "is PLAINTEXT: use SSL or SASL_SSL"),
        (
            ServeSettings(
                security_protocol="SASL_PLAINTEXT", sasl_password=Secret("a"), sasl_password_file=Secret("b")
            ),
            "not both",
        ),
    ],
    ids=["sasl without user", "sasl settings on plaintext", "tls file on plaintext", "two passwords"],
)
def test_settings_that_do_not_fit_together_are_refused_saying_what_to_change(
    settings: ServeSettings, phrase: str
) -> None:
    with pytest.raises(SettingsError, match=phrase):
        settings.client_options()


SASL = ServeSettings(
    bootstrap_servers=("kafka:9093",),
    security_protocol="SASL_PLAINTEXT",
    sasl_mechanism="SCRAM-SHA-256",
    sasl_username="bridge",
    sasl_password=Secret("pw"),
)


def recording_clients(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The arguments every aiokafka client built from now on gives its network client (`AIOKafkaClient`,
    which producers, consumers and admin clients all build with keyword arguments): the one place aiokafka
    takes the security settings."""
    given: list[dict[str, Any]] = []
    build = AIOKafkaClient.__init__

    def record(client: AIOKafkaClient, **arguments: Any) -> None:
        given.append(arguments)
        build(client, **arguments)

    monkeypatch.setattr(AIOKafkaClient, "__init__", record)
    return given


SASL_ARGUMENTS = {
    "security_protocol": "SASL_PLAINTEXT",
    "sasl_mechanism": "SCRAM-SHA-256",
    "sasl_plain_username": "bridge",
    "sasl_plain_password": "pw",
}


async def test_the_producer_and_the_admin_client_get_the_same_security_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given = recording_clients(monkeypatch)
    producer, admin = new_producer(SASL, SASL.client_options()), admin_client(SASL)
    try:
        assert len(given) == 2
        for arguments in given:
            assert {name: arguments.get(name) for name in SASL_ARGUMENTS} == SASL_ARGUMENTS
    finally:
        await producer.stop()
        await admin.close()


async def test_the_readers_get_the_same_security_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.readback.reader import EventReader  # noqa: PLC0415

    given = recording_clients(monkeypatch)
    consume, replay = reading(ConsumeSettings, SASL), reading(ReplaySettings, SASL)
    reader = EventReader("kafka:9093", "t", kafka_options=consume.client_options())
    sink = TopicSink(replay, "copy")
    try:
        assert len(given) == 2
        for arguments in given:
            assert arguments["security_protocol"] == "SASL_PLAINTEXT"
            assert arguments["sasl_mechanism"] == "SCRAM-SHA-256"
    finally:
        await reader.close()
        await sink.close()


def test_secrets_never_show_in_the_settings_repr() -> None:
    settings = replace(SASL, callback_token=(Secret("tok-en"),))
    assert "pw" not in repr(settings).replace("password", "")
    assert "tok-en" not in repr(settings)


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] ...")
    error.reason = reason  # set by the ssl module on the errors it raises
    return error


def _closed_by(cause: BaseException) -> KafkaConnectionError:
    """aiokafka's error for a connection closed by `cause`: the cause only as `__cause__`."""
    error = KafkaConnectionError("Connection at 127.0.0.1:9093 closed")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "phrase"),
    [
        (
            SaslAuthenticationFailed("Invalid username or password"),
            "authentication failed: the broker refused",
        ),
        (UnsupportedSaslMechanismError("no"), "does not offer SASL SCRAM-SHA-256"),
        (
            _closed_by(_ssl_error("SSLV3_ALERT_BAD_CERTIFICATE")),
            "alert 'bad certificate': its listener requires",
        ),
        (_closed_by(_ssl_error("TLSV1_ALERT_UNKNOWN_CA")), "alert 'unknown ca': its listener"),
        (_ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"), "alert 'protocol version'; check the TLS settings"),
        (_ssl_error("WRONG_VERSION_NUMBER"), "TLS handshake failed (WRONG_VERSION_NUMBER)"),
    ],
    ids=["sasl refused", "mechanism", "no client cert", "client CA", "other alert", "not TLS"],
)
def test_a_refusal_of_security_is_explained_in_words_naming_what_to_check(
    error: BaseException, phrase: str
) -> None:
    options = {"sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "bridge"}
    assert phrase in (kafka_security.explain(error, options) or "")


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(111, "Connect call failed"), TimeoutError(), _closed_by(EOFError())],
    ids=["refused", "timeout", "closed"],
)
def test_a_failure_that_is_not_of_security_is_left_as_it_came(error: BaseException) -> None:
    assert kafka_security.explain(error, {}) is None
