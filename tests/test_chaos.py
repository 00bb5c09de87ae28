"""A short run of the history check: under random faults, every 200 is in Kafka and no 4xx is."""

from __future__ import annotations

from pathlib import Path

from tests.chaos import cluster_possible, run_chaos


async def test_under_random_faults_every_200_is_in_kafka_and_no_4xx_is(tmp_path: Path) -> None:
    """On a three-node Apache Kafka cluster (one node on the Tansu lane)."""
    report = await run_chaos(duration_s=10, clients=8, seed=7, cluster=cluster_possible(), directory=tmp_path)
    print(report.table())  # shown with -s, or when the test fails
    assert report.missing == [], "answered 200 but not in Kafka"
    assert report.rejected_but_present == [], "answered 4xx but in Kafka"
    assert report.failed_but_present == [], "answered 503 'failed' (nothing written) but in Kafka"
    assert report.unsettled_ambiguous == 0, "ambiguous != ambiguous_landed + ambiguous_lost"
    assert report.answers["200"] > 100, "the history is too short to say anything"
    assert report.answers["400"] > 0, "no bad callbacks were sent"
    assert sum(report.faults.values()) >= 3, "too few faults were injected"
