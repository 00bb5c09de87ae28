"""A fault-injecting TCP proxy in front of a Kafka broker, aware of Kafka's framing.

It forwards size-prefixed Kafka frames both ways and, on demand: delays the broker's answers, black-holes
all traffic (connections stay open, nothing moves), resets every connection, resets a connection just
before or just after forwarding a Produce request, and rewrites the error code of Produce responses (the
broker really appended the record; the client is told otherwise). The broker must advertise the proxy's
address (`EmbeddedBroker(advertised_port=...)`), so that clients reach every broker through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

from aiokafka.protocol import produce

PRODUCE_API_KEY = 0
_HEADER = struct.Struct(">hhi")  # api_key, api_version, correlation_id
_LENGTH = struct.Struct(">i")


@dataclass
class Faults:
    """What the proxy does to traffic now; tests change these fields while traffic flows."""

    response_delay_s: float = 0.0
    blackhole: bool = False
    reset_before_produce: int = 0
    """Reset this many connections when they carry a Produce request, without forwarding it."""
    reset_after_produce: int = 0
    """Forward this many Produce requests, then reset their connection before the answer comes back."""
    produce_error: int | None = None
    produce_error_times: int | None = None
    """How many Produce responses get `produce_error`; None: every one, until changed."""

    def clear(self) -> None:
        self.response_delay_s, self.blackhole = 0.0, False
        self.reset_before_produce = self.reset_after_produce = 0
        self.produce_error = self.produce_error_times = None


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    broker: asyncio.StreamWriter
    requests: dict[int, tuple[int, int]] = field(default_factory=dict)
    """correlation id -> (api key, api version) of requests awaiting an answer."""
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once a Produce request went through that must never be answered: the connection is reset."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class KafkaProxy:
    def __init__(self, upstream_port: int, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.faults = Faults()
        self.produce_requests = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> KafkaProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset_all()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    def set_blackhole(self, on: bool) -> None:
        self.faults.blackhole = on
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def reset_all(self) -> None:
        """Abort every connection with a TCP reset, as a crashed broker or a cut cable would."""
        for connection in list(self._connections):
            _reset(connection)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._relay(client_reader, client_writer)
        finally:
            self._handlers.discard(handler)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            return
        connection = _Connection(client_writer, broker_writer)
        self._connections.add(connection)
        connection.tasks = [
            asyncio.create_task(self._requests(connection, client_reader)),
            asyncio.create_task(self._responses(connection, broker_reader)),
        ]
        await asyncio.wait(connection.tasks, return_when=asyncio.FIRST_COMPLETED)
        _reset(connection)
        for task in connection.tasks:
            task.cancel()
        await asyncio.wait(connection.tasks)
        self._connections.discard(connection)

    async def _requests(self, connection: _Connection, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                frame = await _read_frame(reader)
                await self._flowing.wait()
                api_key, api_version, correlation_id = _HEADER.unpack_from(frame, 4)
                connection.requests[correlation_id] = (api_key, api_version)
                if api_key == PRODUCE_API_KEY:
                    self.produce_requests += 1
                    if self.faults.reset_before_produce > 0:
                        self.faults.reset_before_produce -= 1
                        return
                cut = api_key == PRODUCE_API_KEY and self.faults.reset_after_produce > 0
                if cut:
                    self.faults.reset_after_produce -= 1
                    connection.cut.set()  # from now on this connection's answers are dropped
                connection.broker.write(frame)
                await connection.broker.drain()
                if cut:
                    await asyncio.sleep(0.2)  # the broker reads and appends it; the answer never arrives
                    return

    async def _responses(self, connection: _Connection, reader: asyncio.StreamReader) -> None:
        """Forward the broker's answers, each `response_delay_s` after it arrived: latency, not a queue."""
        loop = asyncio.get_running_loop()
        due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        writer = asyncio.create_task(self._deliver(connection, due))
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while not writer.done():
                    frame = await _read_frame(reader)
                    await self._flowing.wait()
                    (correlation_id,) = _LENGTH.unpack_from(frame, 4)
                    api_key, api_version = connection.requests.pop(correlation_id, (-1, -1))
                    if connection.cut.is_set():
                        continue
                    if api_key == PRODUCE_API_KEY:
                        frame = self._maybe_rewrite_produce(frame, api_version)
                    due.put_nowait((loop.time() + self.faults.response_delay_s, frame))
        finally:
            writer.cancel()
            await asyncio.wait({writer})

    async def _deliver(self, connection: _Connection, due: asyncio.Queue[tuple[float, bytes]]) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while True:
                at, frame = await due.get()
                await asyncio.sleep(max(0.0, at - loop.time()))
                connection.client.write(frame)
                await connection.client.drain()

    def _maybe_rewrite_produce(self, frame: bytes, api_version: int) -> bytes:
        faults = self.faults
        if faults.produce_error is None or faults.produce_error_times == 0:
            return frame
        if faults.produce_error_times is not None:
            faults.produce_error_times -= 1
        response_type = getattr(produce, f"ProduceResponse_v{api_version}")
        response = response_type.decode(frame[8:])
        response.topics = [
            (topic, [(partition[0], faults.produce_error, *partition[2:]) for partition in partitions])
            for topic, partitions in response.topics
        ]
        encoded: bytes = response.encode()
        body = frame[4:8] + encoded
        return _LENGTH.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = await reader.readexactly(4)
    return size + await reader.readexactly(_LENGTH.unpack(size)[0])


def _reset(connection: _Connection) -> None:
    for writer in (connection.client, connection.broker):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
