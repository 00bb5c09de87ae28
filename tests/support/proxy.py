"""A fault-injecting TCP proxy in front of a Kafka broker, aware of Kafka's framing.

It forwards size-prefixed Kafka frames both ways and, on demand: delays the broker's answers, black-holes
all traffic (connections stay open, nothing moves), resets every connection, resets a connection just
before or just after forwarding a Produce request, and lies about Produce requests in three ways:

- `produce_error` rewrites the error code of the broker's Produce responses: the broker really appended
  the records; the client is told otherwise.
- `refuse_produce` answers a Produce request itself, with that error for every partition, and never forwards
  it: nothing was appended, as when a broker refuses a write (not the leader, too few in-sync replicas, a
  corrupt batch).
- `partition_error` takes the last partition (in request order: the last partition of the last topic) out
  of a Produce request carrying two or more, forwards the rest, and adds that partition to the broker's
  answer with the error: one partition of a multi-partition write refused, never appended, the others
  written. A request with one partition passes untouched.

Answers the proxy makes up keep their place: a connection's answers reach the client in the order of its
requests, as Kafka's protocol requires. Frames are read and rewritten by `tests/support/kafka_frames.py`, with
aiokafka's own structs, for the versions aiokafka 0.14 sends; a Produce request of another version passes
untouched.

The client must reach every broker through the proxy. Either the broker advertises the proxy's address
(`KafkaNode(advertised_port=...)`), or `advertise_self=True` rewrites every broker address in the Metadata
answers to the proxy's own, which puts a proxy in front of a one-broker cluster the test did not start (the
session's shared broker): with several brokers, every client would be sent to the one behind this proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from dataclasses import dataclass, field

from tests.support.kafka_frames import (
    HEADER,
    LENGTH,
    METADATA_API_KEY,
    METADATA_VERSIONS,
    PRODUCE_API_KEY,
    PRODUCE_VERSIONS,
    ProduceRequestFrame,
    read_frame,
    with_brokers_at,
    with_partition_answer,
    with_produce_error,
)


@dataclass
class Faults:
    """What the proxy does to traffic now; tests change these fields while traffic flows.

    A `..._times` field counts down as its fault fires; None fires it on every request until cleared."""

    response_delay_s: float = 0.0
    blackhole: bool = False
    reset_before_produce: int = 0
    """Reset this many connections when they carry a Produce request, without forwarding it."""
    reset_after_produce: int = 0
    """Forward this many Produce requests, then reset their connection before the answer comes back."""
    produce_error: int | None = None
    produce_error_times: int | None = None
    """How many Produce responses get `produce_error`; None: every one, until changed."""
    refuse_produce: int | None = None
    """Answer Produce requests with this error code for every partition, without forwarding them."""
    refuse_produce_times: int | None = None
    """How many Produce requests are refused; None: every one, until changed."""
    partition_error: int | None = None
    """Withhold the last partition of a Produce request of two or more, and answer it with this code."""
    partition_error_times: int | None = None
    """How many multi-partition Produce requests lose a partition; None: every one, until changed."""

    def clear(self) -> None:
        self.response_delay_s, self.blackhole = 0.0, False
        self.reset_before_produce = self.reset_after_produce = 0
        self.produce_error = self.produce_error_times = None
        self.refuse_produce = self.refuse_produce_times = None
        self.partition_error = self.partition_error_times = None


def _fire(code: int | None, times: int | None) -> tuple[bool, int | None]:
    """Whether a fault of `code` fires now, and its `times` afterwards."""
    if code is None or times == 0:
        return False, times
    return True, None if times is None else times - 1


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    broker: asyncio.StreamWriter
    requests: dict[int, tuple[int, int]] = field(default_factory=dict)
    """correlation id -> (api key, api version) of requests awaiting an answer."""
    order: deque[int] = field(default_factory=deque)
    """Correlation ids of the requests awaiting an answer, oldest first (acks=0 Produce requests get none)."""
    made_up: dict[int, bytes] = field(default_factory=dict)
    """The proxy's own answers, by correlation id, each waiting for the answers to earlier requests."""
    withheld: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    """correlation id -> (topic, partition, error code) taken out of a forwarded Produce request."""
    due: asyncio.Queue[tuple[float, bytes]] = field(default_factory=asyncio.Queue)
    """Answers to write to the client, each with the loop time it is due at."""
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once a Produce request went through that must never be answered: the connection is reset."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class KafkaProxy:
    def __init__(
        self,
        upstream_port: int,
        port: int,
        host: str = "127.0.0.1",
        *,
        upstream_host: str | None = None,
        advertise_self: bool = False,
    ) -> None:
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.upstream_host = upstream_host or host
        self.advertise_self = advertise_self
        self.faults = Faults()
        self.produce_requests = 0
        self.most_partitions = 0
        """The most partitions one Produce request carried."""
        self.refused_produces = 0
        """Produce requests answered by the proxy (`refuse_produce`), never forwarded."""
        self.partition_errors: list[tuple[str, int]] = []
        """(topic, partition) withheld from a Produce request (`partition_error`), in the order withheld."""
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
            upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            return
        broker_reader, broker_writer = upstream
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
                frame = await read_frame(reader)
                await self._flowing.wait()
                api_key, api_version, correlation_id = HEADER.unpack_from(frame, 4)
                connection.requests[correlation_id] = (api_key, api_version)
                if api_key == PRODUCE_API_KEY:
                    self.produce_requests += 1
                    if self.faults.reset_before_produce > 0:
                        self.faults.reset_before_produce -= 1
                        return
                    if api_version in PRODUCE_VERSIONS:
                        forwarded = self._produce(connection, ProduceRequestFrame(frame))
                        if forwarded is None:
                            continue
                        frame = forwarded
                    else:  # a version aiokafka does not send: passed on untouched, assumed answered
                        connection.order.append(correlation_id)
                else:
                    connection.order.append(correlation_id)
                cut = api_key == PRODUCE_API_KEY and self.faults.reset_after_produce > 0
                if cut:
                    self.faults.reset_after_produce -= 1
                    connection.cut.set()  # from now on this connection's answers are dropped
                connection.broker.write(frame)
                await connection.broker.drain()
                if cut:
                    await asyncio.sleep(0.2)  # the broker reads and appends it; the answer never arrives
                    return

    def _produce(self, connection: _Connection, request: ProduceRequestFrame) -> bytes | None:
        """The frame to forward for `request`, None if the proxy answers it itself (`refuse_produce`)."""
        self.most_partitions = max(self.most_partitions, request.partition_count)
        # acks=0: the broker answers nothing, and neither does the proxy.
        answered = request.required_acks != 0
        if answered:
            connection.order.append(request.correlation_id)
        refusal = self._maybe_refuse(request)
        if refusal is None:
            return self._maybe_withhold(connection, request) or request.frame
        if answered:
            connection.made_up[request.correlation_id] = refusal
            self._release(connection)
        return None

    def _maybe_refuse(self, request: ProduceRequestFrame) -> bytes | None:
        """The proxy's own answer refusing `request`, if `refuse_produce` fires now."""
        faults = self.faults
        fires, faults.refuse_produce_times = _fire(faults.refuse_produce, faults.refuse_produce_times)
        if not fires or faults.refuse_produce is None:
            return None
        self.refused_produces += 1
        return request.refusal(faults.refuse_produce)

    def _maybe_withhold(self, connection: _Connection, request: ProduceRequestFrame) -> bytes | None:
        """`request` without its last partition, if `partition_error` fires now (two partitions or more)."""
        faults = self.faults
        if request.partition_count < 2:
            return None
        fires, faults.partition_error_times = _fire(faults.partition_error, faults.partition_error_times)
        if not fires or faults.partition_error is None:
            return None
        frame, (topic, partition) = request.without_last_partition()
        self.partition_errors.append((topic, partition))
        if request.required_acks != 0:
            connection.withheld[request.correlation_id] = (topic, partition, faults.partition_error)
        return frame

    def _release(self, connection: _Connection) -> None:
        """Queue the proxy's own answers whose turn has come: every earlier request was answered."""
        loop = asyncio.get_running_loop()
        while connection.order and connection.order[0] in connection.made_up:
            answer = connection.made_up.pop(connection.order.popleft())
            connection.due.put_nowait((loop.time() + self.faults.response_delay_s, answer))

    async def _responses(self, connection: _Connection, reader: asyncio.StreamReader) -> None:
        """Forward the broker's answers, each `response_delay_s` after it arrived: latency, not a queue."""
        loop = asyncio.get_running_loop()
        writer = asyncio.create_task(self._deliver(connection))
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while not writer.done():
                    frame = await read_frame(reader)
                    await self._flowing.wait()
                    (correlation_id,) = LENGTH.unpack_from(frame, 4)
                    api_key, api_version = connection.requests.pop(correlation_id, (-1, -1))
                    with contextlib.suppress(ValueError):
                        connection.order.remove(correlation_id)  # the oldest, as the broker answers in order
                    if connection.cut.is_set():
                        continue
                    if api_key == PRODUCE_API_KEY and api_version in PRODUCE_VERSIONS:
                        frame = self._maybe_rewrite_produce(frame, api_version)
                        withheld = connection.withheld.pop(correlation_id, None)
                        if withheld is not None:
                            frame = with_partition_answer(frame, api_version, *withheld)
                    elif (
                        api_key == METADATA_API_KEY
                        and self.advertise_self
                        and api_version in METADATA_VERSIONS
                    ):
                        frame = with_brokers_at(frame, api_version, self.host, self.port)
                    connection.due.put_nowait((loop.time() + self.faults.response_delay_s, frame))
                    self._release(connection)
        finally:
            writer.cancel()
            await asyncio.wait({writer})

    async def _deliver(self, connection: _Connection) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while True:
                at, frame = await connection.due.get()
                await asyncio.sleep(max(0.0, at - loop.time()))
                connection.client.write(frame)
                await connection.client.drain()

    def _maybe_rewrite_produce(self, frame: bytes, api_version: int) -> bytes:
        faults = self.faults
        fires, faults.produce_error_times = _fire(faults.produce_error, faults.produce_error_times)
        if not fires or faults.produce_error is None:
            return frame
        return with_produce_error(frame, api_version, faults.produce_error)


def _reset(connection: _Connection) -> None:
    for writer in (connection.client, connection.broker):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
