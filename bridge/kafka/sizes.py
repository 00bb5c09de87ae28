"""How large a record is: in a batch of the producer, on the wire, and against its topic's limit.

The broker compares a batch with its topic's `max.message.bytes`; the bridge refuses up front (413) a record
whose batch would be refused, rather than learn it from the broker after the hand-over (a 503 that may still
land). `record_bytes` is a cheap bound, `batch_bytes` the exact size, built only for records near a limit.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from bridge.errors import RecordTooLarge
from bridge.tencent.envelope import Record

BATCH_BYTES = 16384
"""The producer's batch size (aiokafka's default, set explicitly): a batch of several records stays within
it; a record larger than it travels in a batch of its own."""
_CODECS = {
    "none": DefaultRecordBatch.CODEC_NONE,
    "gzip": DefaultRecordBatch.CODEC_GZIP,
    "snappy": DefaultRecordBatch.CODEC_SNAPPY,
    "lz4": DefaultRecordBatch.CODEC_LZ4,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
}


# A batch's header, and at most 5 bytes for each varint of a record: its length, attributes, offset and
# timestamp deltas, key and value lengths, header count.
_BATCH_HEADER_BYTES, _RECORD_OVERHEAD_BYTES = 61, 7 * 5


def _headers(record: Record) -> list[tuple[str, bytes | None]]:
    return list(record.headers)


def record_bytes(record: Record) -> int:
    """At most how many bytes `record` takes in a batch of its own, uncompressed (and so at most what it
    adds to a batch). A bound, not aiokafka's exact count, which costs several times more per callback.
    Computed once per record (`Record.size`): the size check and a topic of small batches both ask."""
    size = record.size
    if size < 0:
        size = _BATCH_HEADER_BYTES + _RECORD_OVERHEAD_BYTES + len(record.key) + len(record.value)
        for name, value in record.headers:
            size += 10 + 4 * len(name) + len(value)  # two varints, and a name's UTF-8 at most 4 bytes a char
        record.size = size
    return size


def batch_bytes(record: Record, compression: str) -> int:
    """The exact size on the wire of a batch holding only `record`: what the broker compares with a topic's
    `max.message.bytes`. Compressed, it may be larger than `record_bytes` (aiokafka's C builder keeps the
    compressed batch even when it did not shrink): callers build it for records near a limit."""
    codec = _CODECS[compression]
    builder = DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, BATCH_BYTES)
    builder.append(0, record.timestamp_ms, key=record.key, value=record.value, headers=_headers(record))
    return len(builder.build())


def check_record_size(record: Record, limits: Mapping[str, int], own_limit: int, compression: str) -> None:
    """Refuse a record its topic would refuse (`limits`, each topic's `max.message.bytes` where it is below
    `own_limit`), or over the bridge's own limit (`own_limit`), compressed with `compression`."""
    limit = limits.get(record.topic, own_limit) if limits else own_limit
    bound = record_bytes(record)
    if compression != "none":
        # aiokafka's C batch builder keeps a compressed batch even when it came out larger (by 28-240
        # bytes for a megabyte that does not compress): bound what a codec can add.
        bound += bound // 6 + 64
    if bound <= limit:
        return
    size = batch_bytes(record, compression)
    if size <= limit:
        return
    whose = (
        f"topic {record.topic}'s max.message.bytes"
        if record.topic in limits
        else "the bridge's limit (--max-body-bytes plus 64 KiB)"
    )
    raise RecordTooLarge(
        f"the callback's record takes {size} bytes, more than {whose} of {limit}; the callback was not "
        "written"
    )
