"""Spark Structured Streaming reading the topic from Kafka: the same answers as the other recipes.

    pip install -e '.[spark]'    # pyspark; Java 17 and Maven for the Kafka connector
    python -m examples.spark_job --bootstrap-servers localhost:9092 --topic tim.official-account

Spark's Kafka source (`spark-sql-kafka-0-10`) is not in the pyspark wheel: `connector_jars()` has Maven copy
it and the jars it needs that pyspark lacks from Maven Central into a cache folder, once per machine, and the
session loads them with `spark.jars`. The stream reads every record from the earliest offset to the latest
(`Trigger.AvailableNow`), parses the value with the generated schema of the topic (`bridge.schema.spark`,
what `bridge schema --format spark --topic tim.official-account` prints: a `StructType` as JSON) in
`from_json`, and keeps one row per callback identity with its number of copies (a streaming aggregation,
the state a deduplicating job keeps); the two answers are batch queries over that table. The identity is
the bridge's: SdkAppid, command, and the record's key, which Spark reads beside the value.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bridge.schema.model import select
from bridge.schema.spark import struct_type
from examples.answers import Answers

POM = Path(__file__).parent / "spark" / "pom.xml"
CONNECTOR_JARS = (
    "spark-sql-kafka-0-10_2.13",
    "spark-token-provider-kafka-0-10_2.13",
    "kafka-clients",
    "commons-pool2",
)
"""What the connector needs beyond pyspark's own jars (the rest of its dependencies, Scala, Hadoop, the
compression codecs, are in the wheel: a second copy of one would clash with it)."""

TOPIC = "tim.official-account"
"""The topic whose schema parses the values: the official-account family's (as the default layout names
it)."""


def connector_jars() -> list[Path]:
    """The connector's jars, resolved by Maven from `spark/pom.xml` on first use, then reused from the cache
    (keyed by the pom's hash; a lock keeps two processes from resolving at once)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tencent-chat-kafka-bridge"
    target = cache / f"spark-kafka-{hashlib.sha256(POM.read_bytes()).hexdigest()[:16]}"
    if not (target / ".complete").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with (target.parent / f"{target.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / ".complete").exists():
                _resolve(target)
    return sorted(target.glob("*.jar"))


def _resolve(target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=target.parent))
    try:
        command = [
            "mvn",
            "--batch-mode",
            "--quiet",
            "--file",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
            f"-DincludeArtifactIds={','.join(CONNECTOR_JARS)}",
        ]
        # Maven from PATH, with arguments of our own.
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)  # noqa: S603
        if result.returncode != 0 or len(list(staging.glob("*.jar"))) != len(CONNECTOR_JARS):
            raise RuntimeError(f"mvn could not resolve Spark's Kafka connector:\n{result.stdout[-3000:]}")
        (staging / ".complete").touch()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def session(jars: list[Path]) -> Any:
    """A local Spark session with the connector, small enough for a laptop (or a test)."""
    # pyspark is an optional extra (`.[spark]`): imported where it is used.
    from pyspark.sql import SparkSession  # noqa: PLC0415

    return (
        SparkSession.builder.master("local[2]")
        .appName("tencent-chat-callbacks")
        .config("spark.jars", ",".join(str(jar) for jar in jars))
        # A short-lived local job: the quick JIT tier and the serial collector start it sooner.
        .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
        .config("spark.sql.shuffle.partitions", "1")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )


def stop(spark: Any) -> None:
    """Stop the session and its JVM: `spark.stop()` alone leaves the JVM running (holding its memory) until
    Python exits, whose py4j connection then logs into streams already closed."""
    # pyspark is an optional extra (`.[spark]`): imported where it is used.
    from pyspark import SparkContext  # noqa: PLC0415

    spark.stop()
    gateway = SparkContext._gateway  # pyspark has no public way to end its JVM
    if gateway is None:
        return
    gateway.shutdown()
    jvm = getattr(gateway, "proc", None)
    if jvm is not None and jvm.stdin is not None:
        jvm.stdin.close()  # the JVM pyspark starts ends when its standard input does
        try:
            jvm.wait(timeout=30)
        except subprocess.TimeoutExpired:
            jvm.kill()
    SparkContext._gateway = None  # the next session starts a JVM of its own
    SparkContext._jvm = None


def answers(bootstrap_servers: str, topic: str, spark: Any | None = None) -> Answers:
    """The answers over every record of `topic` up to its latest offsets when the stream starts; in `spark`,
    else in a session of its own (which the caller stops)."""
    # pyspark is an optional extra (`.[spark]`): imported where it is used.
    from pyspark.sql import functions as f  # noqa: PLC0415
    from pyspark.sql.types import StructType  # noqa: PLC0415

    spark = spark or session(connector_jars())
    records = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", bootstrap_servers)
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
        .load()
    )
    value_schema = StructType.fromJson(struct_type(select(topic=TOPIC)))
    envelope = f.from_json(f.col("value").cast("string"), value_schema)
    events = records.select(f.col("key").cast("string").alias("key"), envelope.alias("e")).select(
        f.col("e.query.SdkAppid").alias("sdk_app_id"),
        f.coalesce(f.col("e.query.CallbackCommand"), f.col("e.callback.CallbackCommand")).alias("command"),
        "key",
        f.col("e.callback.Official_Account").alias("official_account"),
        # EventTime when it is a non-negative decimal number of milliseconds (the schema keeps it a string:
        # Tencent sends a number or its decimal string), else the receive time.
        f.coalesce(
            f.when(
                f.col("e.callback.EventTime").rlike("^[0-9]{1,19}$"),
                f.col("e.callback.EventTime").try_cast("long"),
            ),
            f.col("e.received_at"),
        ).alias("event_time_ms"),
    )
    per_callback = events.groupBy("sdk_app_id", "command", "key").agg(
        f.count("*").alias("copies"),
        f.min("official_account").alias("official_account"),
        f.min("event_time_ms").alias("event_time_ms"),
    )
    table = f"callbacks_{abs(hash((bootstrap_servers, topic)))}"
    with tempfile.TemporaryDirectory(prefix="spark-checkpoint-") as checkpoint:
        query = (
            per_callback.writeStream.outputMode("complete")
            .format("memory")
            .queryName(table)
            .option("checkpointLocation", checkpoint)
            .trigger(availableNow=True)
            .start()
        )
        query.awaitTermination()
    # The table's name is the job's own: nothing from outside is in these queries.
    messages = spark.sql(
        f"""SELECT official_account, event_time_ms - event_time_ms % 3600000 AS hour_ms, count(*) AS messages
            FROM {table} WHERE command = 'OfficialAccount.CallbackAfterSendMsg'
            GROUP BY official_account, hour_ms"""  # noqa: S608
    ).collect()
    counts = spark.sql(
        f"""SELECT coalesce(sum(copies), 0), count(*), coalesce(sum(IF(copies > 1, copies, 0)), 0)
            FROM {table}"""  # noqa: S608
    ).first()
    return Answers.of([tuple(row) for row in messages], *counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--bootstrap-servers", default="localhost:9092", help="Kafka brokers (localhost:9092)"
    )
    parser.add_argument(
        "--topic", default="tim.official-account", help="the official-account topic (tim.official-account)"
    )
    arguments = parser.parse_args()
    spark = session(connector_jars())
    spark.sparkContext.setLogLevel("WARN")
    try:
        print(answers(arguments.bootstrap_servers, arguments.topic, spark).report())
    finally:
        stop(spark)


if __name__ == "__main__":
    main()
