"""A short run of the history check on the three-node cluster (one node on the Tansu lane), every fault kind
allowed: every 200 is in Kafka as sent, no 4xx is, and every ambiguous answer was followed to its end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import cluster_possible, run_chaos

pytestmark = pytest.mark.kafka  # starts brokers of its own


async def test_under_random_faults_every_200_is_in_kafka_as_sent_and_no_4xx_is(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    report = await run_chaos(
        duration_s=40, clients=8, seed=7, cluster=cluster_possible(), directory=tmp_path, history_file=history
    )
    print(report.table())  # shown with -s, or when the test fails
    print(f"history: {history}")
    assert not report.broken, report.problems()
    assert report.unsettled_ambiguous == 0, "ambiguous != ambiguous_landed + ambiguous_lost"
    assert report.answers["200"] > 100, "the history is too short to say anything"
    assert report.answers["400"] > 0, "no bad callbacks were sent"
    assert len(report.callbacks_by_topic) == 6, "not every bridge topic was written"
    assert sum(report.faults.values()) >= 5, "too few faults were injected"
