"""Redis holds a snapshot's KPIs per dimension value beside it, written by the same script:
`funnel:dimensions:<pipeline>` (field = dimension, value = its values' JSON), gone once a newer
snapshot carries none, and the other keys of the snapshot as before."""

import asyncio
import json

import pytest
import redis

from models.config import FunnelConfig, load_config
from models.snapshot import RepRevenue, TeamRevenue, build_snapshot

from .test_e2e_outputs import RedisServer, written_by_its_own_sink
from .test_snapshot_dimensions import WEB, samples_of


@pytest.fixture
def server(tmp_path):
    running = RedisServer(tmp_path).start()
    yield running
    running.stop()


def snapshot(sequence, dimensions):
    config = FunnelConfig.model_validate({**load_config().model_dump(), "dimensions": dimensions})
    built = build_snapshot(samples_of(WEB), config, "default", as_of_ms=0, generated_ms=0,
                           generation=1, sequence=sequence, partitions=1,
                           top_customers=[("Acme", 10.0), ("Bolt", 5.0)])
    return built.model_copy(update={"leaderboard": [RepRevenue(owner="ann", won_revenue=7.0)],
                                    "teams": [TeamRevenue(team="East", won_revenue=7.0)]})


def test_the_dimensions_hash_goes_with_its_snapshot(server):
    url = f"redis://127.0.0.1:{server.port}/0"
    store = redis.Redis(port=server.port)
    with_dimensions = snapshot(1, {"region": {}, "sector": {}})
    asyncio.run(written_by_its_own_sink(url, "funnel", with_dimensions))
    stored = {k.decode(): json.loads(v) for k, v in store.hgetall("funnel:dimensions:default").items()}
    assert stored == {name: [row.model_dump() for row in rows]
                      for name, rows in with_dimensions.dimensions.items()}
    assert [row["value"] for row in stored["region"]] == ["web", "none", "other"]
    assert json.loads(store.get("funnel:kpis:default"))["dimensions"] == stored
    # the keys after it in the script's arguments are unchanged
    assert store.zrange("funnel:leaderboard:default", 0, -1, withscores=True) == [(b"ann", 7.0)]
    assert store.zrange("funnel:teams:default", 0, -1, withscores=True) == [(b"East", 7.0)]
    assert store.hgetall("funnel:clv:default") == {b"Acme": b"10.0", b"Bolt": b"5.0"}
    # a newer snapshot without dimensions (none named any more) leaves none behind
    asyncio.run(written_by_its_own_sink(url, "funnel", snapshot(2, {})))
    assert not store.exists("funnel:dimensions:default")
    assert "dimensions" not in json.loads(store.get("funnel:kpis:default"))
    assert store.hgetall("funnel:clv:default") == {b"Acme": b"10.0", b"Bolt": b"5.0"}
