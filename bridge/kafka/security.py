"""How every Kafka client of the bridge connects: TLS and SASL settings turned into aiokafka's arguments.

One method, `KafkaConnection.client_options()` (`bridge.settings`), for the producer (`publisher`),
the admin client (`topics`), the readers (`consume`, `replay`, `EventReader`) and replay's topic sink, so
they cannot drift apart. TLS verifies the brokers' certificates and host names (aiokafka's
`create_ssl_context`), against `--ssl-cafile` or the system's CAs.

When a client cannot start, aiokafka says only "Unable to bootstrap from [...]": why each broker refused is
logged and dropped. `start_client` then opens one connection itself, as aiokafka would, and raises
`SecureConnectionFailed` naming the cause when it is one of security: a SASL authentication refused, a
broker's certificate not trusted, a client certificate missing or not accepted.

A SASL password read from a file changes while the bridge runs (`use_sasl_password`, on SIGHUP or when the
file changes): the connections opened from then on log in with the new one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol

from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed, UnsupportedSaslMechanismError

_DIAGNOSIS_TIMEOUT_S = 5.0


# aiokafka ships no type information: its exceptions are Any to mypy.
class SecureConnectionFailed(KafkaConnectionError):  # type: ignore[misc]
    """A broker refused the bridge's credentials or certificate, or the bridge refused the broker's.

    Still a `KafkaConnectionError`, so every caller handles it as before; its message is the cause alone,
    without the class name aiokafka's errors put before theirs.
    """

    says_it_all: ClassVar[bool] = True

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "the secure connection to Kafka failed"


class _SaslClient(Protocol):
    """aiokafka's `AIOKafkaClient`, as `use_sasl_password` sees it."""

    _sasl_plain_password: str | None


def use_sasl_password(client: _SaslClient, password: str) -> None:
    """The SASL password `client`'s connections opened from now on log in with.

    aiokafka 0.14 takes the password once, in `AIOKafkaClient.__init__`, keeps it as `_sasl_plain_password`
    and passes it to every `create_conn` it makes (`_get_conn`, and `bootstrap`'s): a connection to a broker
    it has not met yet, or one that replaces a connection closed, logs in with what that attribute holds
    then. Setting it is the whole change; the connections already logged in stay as they are (the broker
    authenticated them, and aiokafka never re-authenticates one). Raises `RuntimeError` if aiokafka no longer
    keeps the password there, so that a reload says it failed rather than keep the old one silently.
    """
    if not hasattr(client, "_sasl_plain_password"):
        raise RuntimeError(
            "this aiokafka keeps no _sasl_plain_password on its client: the new SASL password cannot be put "
            "in use without a restart"
        )
    client._sasl_plain_password = password


class _Startable(Protocol):
    async def start(self) -> None: ...


async def start_client(client: _Startable, servers: Sequence[str], options: Mapping[str, Any]) -> None:
    """`client.start()`, for any aiokafka client built with `options` (`KafkaConnection.client_options()`).

    Raises `SecureConnectionFailed`, with the cause in words, when the start failed for a reason of
    security; any other failure is raised as it came.
    """
    try:
        await client.start()
    except KafkaConnectionError as exc:
        if options.get("security_protocol", "PLAINTEXT") == "PLAINTEXT":
            raise
        reason = await security_failure(servers, options)
        if reason is None:
            raise
        raise SecureConnectionFailed(reason) from exc


async def security_failure(servers: Sequence[str], options: Mapping[str, Any]) -> str | None:
    """Why connecting to `servers` with `options` fails, if a matter of security; None if it does not."""
    for host, port, _family in collect_hosts(list(servers), randomize=False):
        try:
            async with asyncio.timeout(_DIAGNOSIS_TIMEOUT_S):
                connection = await create_conn(
                    host, port, request_timeout_ms=int(_DIAGNOSIS_TIMEOUT_S * 1000), **options
                )
        except Exception as exc:  # noqa: BLE001 - whatever failed is looked at, and kept if not security
            reason = explain(exc, options)
            if reason is not None:
                return reason
            continue
        connection.close()
    return None


def explain(exc: BaseException, options: Mapping[str, Any]) -> str | None:
    """`exc`, or an exception it was raised from, in words, when it is a refusal of security."""
    for error in _chain(exc):
        if isinstance(error, SaslAuthenticationFailed):
            said = error.args[0] if error.args and isinstance(error.args[0], str) else error.description
            return (
                f"authentication failed: the broker refused SASL {options.get('sasl_mechanism')} for user "
                f"{options.get('sasl_plain_username')!r} ({said}); check --sasl-username and "
                "--sasl-password (or --sasl-password-file)"
            )
        if isinstance(error, UnsupportedSaslMechanismError):
            return (
                f"the broker does not offer SASL {options.get('sasl_mechanism')} on this listener "
                f"({error}); check --sasl-mechanism"
            )
        if isinstance(error, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate verify failed: {error.verify_message}; the broker's certificate is not "
                "signed by a CA in --ssl-cafile (the system's CAs without it), or does not name the address "
                "dialled"
            )
        if isinstance(error, ssl.SSLError):
            return _tls_refusal(error)
    return None


def _tls_refusal(error: ssl.SSLError) -> str:
    reason = error.reason or str(error)
    alert = reason.partition("_ALERT_")[2].replace("_", " ").lower()
    if "certificate" in alert or alert == "unknown ca":  # Kafka sends "bad certificate" for none at all
        return (
            f"the broker refused the TLS handshake with the alert '{alert}': its listener requires a client "
            "certificate signed by a CA it trusts; check --ssl-certfile and --ssl-keyfile"
        )
    if alert:
        return f"the broker refused the TLS handshake with the alert '{alert}'; check the TLS settings"
    return f"TLS handshake failed ({reason}); check --security-protocol and the TLS files"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from (aiokafka keeps a TLS alert as the cause of a close)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
