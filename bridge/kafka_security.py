"""How every Kafka client of the bridge connects: TLS and SASL settings turned into aiokafka's arguments.

One function for the producer (`publisher`), the admin client (`topics`), the readers (`consume`,
`replay`, `EventReader`) and replay's topic sink, so they cannot drift apart. TLS verifies the brokers'
certificates and host names (aiokafka's `create_ssl_context`), against `--ssl-cafile` or the system's CAs.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka.helpers import create_ssl_context

from bridge.secret import Secret
from bridge.settings import Settings, SettingsError

_TLS = frozenset({"SSL", "SASL_SSL"})
_SASL = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


def kafka_connection_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient.

    Raises `SettingsError` for settings that do not fit together or files that cannot be loaded.
    """
    protocol = settings.security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    tls_files = {
        "--ssl-cafile": settings.ssl_cafile,
        "--ssl-certfile": settings.ssl_certfile,
        "--ssl-keyfile": settings.ssl_keyfile,
    }
    if protocol in _TLS:
        options["ssl_context"] = _ssl_context(settings)
    elif given := [flag for flag, value in tls_files.items() if value is not None]:
        raise SettingsError(
            f"{', '.join(given)} given, but --security-protocol is {protocol}: use SSL or SASL_SSL"
        )
    password = _password(settings)
    sasl = {
        "--sasl-mechanism": settings.sasl_mechanism,
        "--sasl-username": settings.sasl_username,
        "--sasl-password": password,
    }
    if protocol in _SASL:
        missing = [flag for flag, value in sasl.items() if value is None]
        if missing or password is None:
            raise SettingsError(f"--security-protocol {protocol} needs {', '.join(missing)}")
        options.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=password.reveal(),
        )
    elif given := [flag for flag, value in sasl.items() if value is not None]:
        raise SettingsError(
            f"{', '.join(given)} given, but --security-protocol is {protocol}: use SASL_PLAINTEXT or SASL_SSL"
        )
    return options


def _password(settings: Settings) -> Secret | None:
    if settings.sasl_password is not None and settings.sasl_password_file is not None:
        raise SettingsError("give --sasl-password or --sasl-password-file, not both")
    return settings.sasl_password or settings.sasl_password_file


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    if settings.ssl_keyfile is not None and settings.ssl_certfile is None:
        raise SettingsError("--ssl-keyfile needs --ssl-certfile, the certificate it belongs to")
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile, certfile=settings.ssl_certfile, keyfile=settings.ssl_keyfile
        )
    except FileNotFoundError as exc:
        raise SettingsError(f"cannot load TLS files: {exc.filename or 'a file'} does not exist") from None
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(f for f in (settings.ssl_cafile, settings.ssl_certfile, settings.ssl_keyfile) if f)
        raise SettingsError(f"cannot load TLS files ({files}): {exc}") from None
    return context
