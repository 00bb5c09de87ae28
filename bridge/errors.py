"""The bridge's exception tree: each error knows its HTTP status, its Tencent ErrorCode and retriability.

The path raises these; the error middleware in `bridge.ingest.server` turns them into Tencent-style answers
in one place. ErrorCodes are five-digit numbers built from the HTTP status so they never collide with the
codes Tencent gives meaning to for "before" callbacks (1 rejects the user's action, 2 drops the message,
120001-130000 are custom errors). Every 503 is an `Unavailable`: retriable, with `Retry-After`.

    BridgeError                 500  never answered as such: every failure below has its own status
      BadCallback               400  not a callback the bridge can publish
        InvalidQuery            400    40001
        InvalidJson             400    40002
        InvalidField            400    40003
        CommandMismatch         400    40004
        UnreadableBody          400    40005
      MalformedRequest          400  refused by aiohttp's HTTP parser (its status, 400 so far)
      Unauthorized              401  the signature failed a check
        MissingSignature        401    40101
        MalformedSignature      401    40102
        StaleSignature          401    40103
        SignatureMismatch       401    40104
      ForbiddenApp              403  an SdkAppid not of this bridge
      NotFound                  404
      MethodNotAllowed          405
      BodyTimeout               408
      BodyTooLarge              413
      RecordTooLarge            413  larger than its topic takes; nothing sent
      Unavailable               503  not acknowledged; may be sent again (ambiguous: it may still land)
        PublishError            503  Kafka did not confirm the write
          BrokerNotReady        503    50301
          DeliveryTimeout       503    50302
          BrokerRejected        503    50303
        Overloaded              503    50304
        ShuttingDown            503    50305
        InternalError           503    50399  a bug: never a 500

Apart from the tree, for the command line: `CommandError` (a command that cannot go on) carries its
`ExitStatus`, turned into `bridge COMMAND: message` and that status in `bridge.cli.main` alone.
"""

from __future__ import annotations

import asyncio
import enum


class BridgeError(Exception):
    """A failure that the bridge answers with a FAIL body and never a 200."""

    status: int = 500
    error_code: int = 50000
    retriable: bool = False

    def __init__(self, info: str) -> None:
        super().__init__(info)
        self.info = info


class BadCallback(BridgeError):
    """The request is not a callback the bridge can publish: bad query, body or field."""

    status = 400
    error_code = 40000


class InvalidQuery(BadCallback):
    error_code = 40001


class InvalidJson(BadCallback):
    error_code = 40002


class InvalidField(BadCallback):
    error_code = 40003


class CommandMismatch(BadCallback):
    error_code = 40004


class UnreadableBody(BadCallback):
    """The body could not be read: a bad Content-Encoding, a truncated body, a client that left."""

    error_code = 40005


class MalformedRequest(BridgeError):
    """aiohttp's HTTP parser refused the request before any handler ran (`bridge.ingest.runner`).

    A request line or header over the limits, a malformed request line or header, bad chunked framing. The
    status is the one aiohttp chose (400 for all of them in aiohttp 3.14); the ErrorCode is built from it.
    """

    status = 400
    error_code = 40006

    def __init__(self, info: str, status: int = 400) -> None:
        super().__init__(info)
        if status != self.status:
            self.status, self.error_code = status, status * 100


class BodyTimeout(BridgeError):
    """The client did not finish sending the body in time."""

    status = 408
    error_code = 40800


class Unauthorized(BridgeError):
    """Webhook authentication is on and the callback's signature failed a check; the subclass says which."""

    status = 401
    error_code = 40100


class MissingSignature(Unauthorized):
    error_code = 40101


class MalformedSignature(Unauthorized):
    error_code = 40102


class StaleSignature(Unauthorized):
    """`RequestTime` is further from the bridge's clock than `--max-clock-skew`: a replay, or a bad clock."""

    error_code = 40103


class SignatureMismatch(Unauthorized):
    error_code = 40104


class ForbiddenApp(BridgeError):
    """The callback's `SdkAppid` is not one of the apps in `--sdk-app-id`."""

    status = 403
    error_code = 40300


class NotFound(BridgeError):
    status = 404
    error_code = 40400


class MethodNotAllowed(BridgeError):
    status = 405
    error_code = 40500


class BodyTooLarge(BridgeError):
    status = 413
    error_code = 41300


class RecordTooLarge(BridgeError):
    """The callback's record is larger than its topic takes (`max.message.bytes`, read at start): the broker
    would refuse it, so it is not sent. A 413, not a 503: sending it again cannot help until the topic's
    limit is raised, and the answer must say that nothing was written."""

    status = 413
    error_code = 41301


class Unavailable(BridgeError):
    """A 503: the callback was not acknowledged, and may be sent again.

    `ambiguous` is true when the record may still land although the answer is 503. `fate`, when set, is
    resolved once that is settled: True if the record landed after all, False if it was given up.
    """

    status = 503
    error_code = 50300
    retriable = True

    def __init__(
        self, info: str, *, ambiguous: bool = False, fate: asyncio.Future[bool] | None = None
    ) -> None:
        super().__init__(info)
        self.ambiguous = ambiguous
        self.fate = fate


class PublishError(Unavailable):
    """Kafka did not confirm the write: the one kind of 503 that `bridge_publish_errors_total` counts.

    Ambiguous when the record was handed to the producer and the broker may have appended it (a timeout, a
    connection lost after sending, an error the broker gives after appending).
    """


class BrokerNotReady(PublishError):
    """The producer is not connected, or the bridge's topics are missing or not as at start."""

    error_code = 50301


class DeliveryTimeout(PublishError):
    """The broker did not confirm within the delivery timeout."""

    error_code = 50302


class BrokerRejected(PublishError):
    """The broker or the client answered the write with an error."""

    error_code = 50303


class Overloaded(Unavailable):
    """`--max-in-flight` callbacks are already waiting for the broker."""

    error_code = 50304


class ShuttingDown(Unavailable):
    """The bridge is stopping and takes no new callbacks."""

    error_code = 50305


class InternalError(Unavailable):
    """A bug in the bridge. Where in the path it struck is unknown, so the outcome is ambiguous, and its
    record, if any, cannot be followed: it counts as lost at once."""

    error_code = 50399

    def __init__(self) -> None:
        super().__init__("internal error in the bridge; the callback is not acknowledged", ambiguous=True)


def describe(exc: BaseException) -> str:
    """An exception in one line: its class name, and its message when it has one.

    aiokafka's messages often begin with the class name already; it is not repeated. An exception whose
    message says it all (`says_it_all`, such as the bridge's own account of a refused secure connection) is
    its message alone.
    """
    text, name = str(exc), type(exc).__name__
    if not text or text == name:
        return name
    if getattr(exc, "says_it_all", False):
        return text
    return text if text.startswith(name) else f"{name}: {text}"


# --- the command line's errors ---------------------------------------------------------------------------


class ExitStatus(enum.IntEnum):
    """The exit statuses of the `bridge` commands, each in one place."""

    OK = 0
    FAILED = 1
    """The command ran and failed: records not copied, a topic that cannot be read, a port taken."""
    DRIFT = 1
    """`bridge topics ensure`: a topic is not as intended (left unchanged)."""
    USAGE = 2
    """Bad flags, settings or files given: nothing was done."""
    KAFKA_FAILED = 3
    """The Kafka cluster could not be reached, or refused."""
    INTERRUPTED = 130
    """Stopped by Ctrl-C before the end (128 + SIGINT, as a shell says)."""


class CommandError(Exception):
    """A command cannot go on: `bridge.cli.main` prints `bridge COMMAND: message` on stderr and exits with
    `exit_status`."""

    def __init__(self, message: str, exit_status: int = ExitStatus.FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status
