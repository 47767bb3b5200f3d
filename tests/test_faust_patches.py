"""The offset Faust commits (streams.worker.faust_patches), on a real but unstarted Faust consumer.

F7 (bench/RELIABILITY-FINDINGS.md): records fetched and dropped before a partition's first
commit were committed past, so customer credits were lost after crashes.
"""

from __future__ import annotations

import faust
import pytest
from faust.types import TP

from streams.worker import faust_patches

TOPIC_PARTITION = TP("funnel-kpi-customer-credits", 0)


@pytest.fixture
def consumer():
    faust_patches.apply(100)
    app = faust.App("faust-patches-test", broker="kafka://127.0.0.1:9")
    return app.consumer


def commit_offset(consumer, acked: list[int], committed: int | None = None) -> int | None:
    consumer._acked[TOPIC_PARTITION] = list(acked)
    consumer._committed_offset[TOPIC_PARTITION] = committed
    return consumer._new_offset(TOPIC_PARTITION)


def test_nothing_committed_and_the_first_offsets_not_acknowledged_commits_nothing(consumer):
    # Faust committed 254 here: offsets 0-250 (dropped at a rebalance) were never processed.
    assert commit_offset(consumer, [251, 252, 253]) is None


def test_nothing_committed_commits_the_run_from_offset_zero(consumer):
    assert commit_offset(consumer, [0, 1, 2, 4]) == 3
    assert consumer._acked[TOPIC_PARTITION] == [4]


def test_the_committed_offset_itself_missing_commits_nothing(consumer):
    # Faust let exactly one missing offset through (it checked head - committed > 1).
    assert commit_offset(consumer, [200, 201], committed=199) is None
    assert commit_offset(consumer, [205, 206], committed=199) is None


def test_a_run_from_the_committed_offset_is_committed(consumer):
    assert commit_offset(consumer, [199, 200, 201, 203], committed=199) == 202


def test_offsets_acknowledged_twice_do_not_stop_the_run(consumer):
    # F4: re-delivered offsets acknowledged twice made Faust commit one offset at a time.
    assert commit_offset(consumer, [10, 11, 11, 12, 12, 13], committed=10) == 14


def test_offsets_the_broker_skipped_count_as_acknowledged(consumer):
    # Faust records offsets absent from a fetch (compaction, transaction markers) as gaps.
    consumer._gap[TOPIC_PARTITION].addi(10, 12)  # offsets 10 and 11
    assert commit_offset(consumer, [12, 13], committed=10) == 14
