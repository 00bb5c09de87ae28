"""The load generator of `bridge bench`: realistic callbacks over raw keep-alive HTTP/1.1.

The callbacks are the test fixtures' mix of commands, each with a unique `MsgKey` (and group `MsgSeq`), an
owning account drawn from `--accounts`, and a few bodies padded to tens of KB. Requests are written and
answers parsed with a bare asyncio protocol rather than aiohttp's client, which costs several times more
CPU per request: the generator shares the machine with the server it measures, and reports its own CPU.

Two modes: a closed loop (each connection sends its next request when the last is answered) and an open
loop (requests are due at a constant rate whether or not earlier ones were answered; latency counts from
the time a request was due, so a stalled server cannot hide its stall by slowing the generator down).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson

from bridge.tencent.samples import SEED_CALLBACK, SEED_QUERY

# The fixtures of a source checkout; an installed package falls back to the `bridge dev` seed callback.
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
# (bytes of padding in CloudCustomData, share in %): most bodies as the fixtures are (0.5-1.5 KB), some
# long messages, a few large custom-data payloads.
BODY_PADDING = ((0, 90), (4 * 1024, 8), (32 * 1024, 2))
_KEY, _SEQ, _ACCOUNT = b"__bench_key__", b'"__bench_seq__"', b"__bench_account__"
# Fields holding the owning entity of the fixtures' commands (commands.py's entity rules).
_ACCOUNT_FIELDS = ("Official_Account", "From_Account", "GroupId")
_GRACE_S = 10.0


def _fixtures() -> list[tuple[dict[str, str], dict[str, Any]]]:
    found = [orjson.loads(path.read_bytes()) for path in sorted(FIXTURES.glob("*.json"))]
    if not found:
        return [(SEED_QUERY, SEED_CALLBACK)]
    return [(data["query"], data["body"]) for data in found]


def _template(body: dict[str, Any], padding: int) -> bytes:
    body = dict(body)
    for name in _ACCOUNT_FIELDS:
        if name in body:
            body[name] = _ACCOUNT.decode()
    if isinstance(body.get("Info"), dict):
        body["Info"] = {**body["Info"], "To_Account": _ACCOUNT.decode()}
    body["MsgKey"] = _KEY.decode()  # the record key of messages, part of it for other events
    if "MsgSeq" in body:
        body["MsgSeq"] = _SEQ.strip(b'"').decode()  # a group message's key is GroupId:MsgSeq
    if padding:
        body["CloudCustomData"] = "x" * padding
    return orjson.dumps(body)


class CallbackMix:
    """An endless stream of distinct callback requests, as bytes ready for the socket.

    `templates` are the (path with query, body with placeholders) of each command and padding, `order` the
    templates' indexes in the order the stream cycles through them (their shares, shuffled): the wrk driver
    posts the same mix from them. Every key is new in every run: `MsgKey` is `<pid>_<time ms>_<n>` (digit
    runs as short as Tencent's own, 71_1_1698741698) and a group message's `MsgSeq` counts up from the time
    in microseconds, so a second run against the same bridge is not answered from its dedup window.
    """

    def __init__(self, host: str, port: int, path: str, accounts: int, seed: int = 7) -> None:
        rng = random.Random(seed)  # noqa: S311 - shuffles the mix of commands, not a secret
        self.templates: list[tuple[str, bytes]] = []
        order: list[int] = []
        for query, body in _fixtures():
            for padding, share in BODY_PADDING:
                order += [len(self.templates)] * share
                self.templates.append((f"{path}?{urlencode(query)}", _template(body, padding)))
        rng.shuffle(order)
        self.order = order
        heads = [
            f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: "
            for target, _ in self.templates
        ]
        self._cycle = [(heads[index], self.templates[index][1]) for index in order]
        self.account_count = accounts
        self._accounts = [f"bench_account_{number}".encode() for number in range(accounts)]
        self._run = f"{os.getpid()}_{time.time_ns() // 1_000_000}".encode()
        self._seq_base = time.time_ns() // 1000
        self._count = itertools.count()

    def next_request(self) -> bytes:
        n = next(self._count)
        head, body = self._cycle[n % len(self._cycle)]
        # A multiplicative hash spreads accounts over commands and sizes instead of tying them together.
        account = self._accounts[(n * 2654435761 % 2**32 >> 7) % len(self._accounts)]
        key = self._run + b"_" + str(n).encode()
        seq = str(self._seq_base + n).encode()
        body = body.replace(_ACCOUNT, account).replace(_KEY, key).replace(_SEQ, seq)
        return b"".join((head, str(len(body)).encode(), b"\r\n\r\n", body))


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request outstanding at a time; answers give a status."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - TCP connections only
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._waiter is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).lower()
            length = _content_length(head)
            if len(self._buffer) < end + 4 + length:
                return
            del self._buffer[: end + 4 + length]
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(int(head[9:12]))

    async def request(self, data: bytes) -> int:
        assert self._transport is not None  # noqa: S101 - set on connecting
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _content_length(head: bytes) -> int:
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    line_end = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : line_end if line_end >= 0 else len(head)])


async def _connect(host: str, port: int) -> _Connection:
    _, connection = await asyncio.get_running_loop().create_connection(_Connection, host, port)
    return connection


@dataclass
class LoadResult:
    """What one run saw: the latency in seconds of every answered request, the statuses, the CPU used."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    generator_cpu_s: float = 0.0
    intended: int = 0
    """Open loop: requests that were due (each should have been answered)."""
    answered: int | None = None
    """Requests answered, when not one per latency: wrk's histogram has its correction for coordinated
    omission in it, as its own percentiles do."""

    @property
    def requests(self) -> int:
        return len(self.latencies) if self.answered is None else self.answered


async def _exchange(
    connection: _Connection, mix: CallbackMix, result: LoadResult, *, since: float, address: tuple[str, int]
) -> _Connection:
    """Send the next request; count its status and its latency from `since`. Reconnect if it was closed."""
    try:
        status = await connection.request(mix.next_request())
    except ConnectionError:
        result.statuses["connection closed"] += 1
        return await _connect(*address)
    result.latencies.append(time.perf_counter() - since)
    result.statuses[str(status)] += 1
    return connection


async def closed_loop(
    host: str, port: int, mix: CallbackMix, *, connections: int, seconds: float
) -> LoadResult:
    """`connections` connections, each sending its next request as soon as the last one is answered."""
    clock = time.perf_counter
    result = LoadResult(seconds)
    cpu_start = time.process_time()
    stop_at = clock() + seconds

    async def run_connection() -> None:
        connection = await _connect(host, port)
        try:
            while (sent := clock()) < stop_at:
                connection = await _exchange(connection, mix, result, since=sent, address=(host, port))
        finally:
            connection.close()

    await asyncio.gather(*(run_connection() for _ in range(connections)))
    result.generator_cpu_s = time.process_time() - cpu_start
    return result


async def open_loop(
    host: str, port: int, mix: CallbackMix, *, rate: float, connections: int, seconds: float
) -> LoadResult:
    """Requests due every 1/`rate` s, each sent on the first free of `connections` connections."""
    clock = time.perf_counter
    result = LoadResult(seconds)
    due: asyncio.Queue[float | None] = asyncio.Queue()
    cpu_start = time.process_time()
    begin = clock()

    async def schedule() -> None:
        while (at := begin + result.intended / rate) < begin + seconds:
            if (wait := at - clock()) > 0:
                await asyncio.sleep(wait)
            due.put_nowait(at)
            result.intended += 1
        for _ in range(connections):
            due.put_nowait(None)

    async def run_connection() -> None:
        connection = await _connect(host, port)
        try:
            while (at := await due.get()) is not None:
                # From the time the request was due: time spent waiting for a free connection counts.
                connection = await _exchange(connection, mix, result, since=at, address=(host, port))
        finally:
            connection.close()

    async with asyncio.timeout(seconds + _GRACE_S):
        await asyncio.gather(schedule(), *(run_connection() for _ in range(connections)))
    result.generator_cpu_s = time.process_time() - cpu_start
    return result


def percentile(ordered: list[float], fraction: float) -> float:
    """The value below which `fraction` of the sorted values lie (nearest rank)."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.5) - 1))]
