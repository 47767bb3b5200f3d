"""Stalled deals with a controlled clock: entering, leaving and re-entering stall, thresholds
per stage, one alert per stall episode across a restart."""

import orjson

from models.config import DEFAULT_CONFIG, Clock, load_config
from processors.clock import EventClock
from processors.deals import DealProcessor
from processors.records import Record

DAY = 86_400_000
BASE = 1_700_000_000_000
CONFIG = load_config()


class World:
    """A processor over a dict table whose clock the test moves by hand."""

    def __init__(self, table=None, config=CONFIG):
        self.clock = EventClock(Clock.STREAM)
        self.proc = DealProcessor(config, self.clock, max_skew_ms=10 * 365 * DAY)
        self.table = {} if table is None else table
        self.proc.folds.rebuild({0}, (self.proc.contribution_of_stored(v) for v in self.table.values()))
        self.offset = 0

    def run(self, records, stall_checks=()):
        batch = self.proc.process(records, self.table.get, stall_checks)
        for deal_id, value, _ in batch.writes:
            self.table[deal_id] = value
        return [(a.type, a.deal_id, a.stage) for a in batch.alerts], batch.alerts

    def event(self, deal_id, day, **change):
        self.offset += 1
        doc = {"event_id": f"{deal_id}-{day}-{self.offset}", "deal_id": deal_id,
               "occurred_at": _iso(BASE + int(day * DAY)), **change}
        return self.run([Record(None, orjson.dumps(doc), "crm.events", 0, self.offset)])[0]

    def tick(self, day=None):
        if day is not None:
            self.clock.observe(BASE + int(day * DAY))
        return self.run([], stall_checks=[0])


def _iso(ms):
    from models.alerts import iso

    return iso(ms)


def test_entering_leaving_and_reentering_stall():
    world = World()
    world.event("d1", 0, stage="lead", amount=100.0, owner="ann")
    assert world.tick(30)[0] == []                       # exactly 30 days: not stalled
    alerts, raw = world.tick(30.01)
    assert alerts == [("deal.stalled", "d1", "lead")]
    assert raw[0].stall_after_seconds == 30 * 86400 and raw[0].owner == "ann"
    assert world.tick(40)[0] == []                       # still the same episode: no repeat
    assert world.event("d1", 41, stage="mql") == [("deal.unstalled", "d1", "lead")]
    assert world.tick(60)[0] == []                       # 19 days in mql
    assert world.tick(71.5)[0] == [("deal.stalled", "d1", "mql")]
    assert world.event("d1", 72, stage="won") == [("deal.unstalled", "d1", "mql")]
    assert world.tick(200)[0] == []                      # closed deals never stall


def test_stall_ids_are_stable_per_episode_and_differ_between_episodes():
    world = World()
    world.event("d1", 0, stage="lead")
    first = world.tick(31)[1][0]
    world.event("d1", 32, stage="mql")
    world.event("d1", 33, stage="lead")                  # back to lead: a new stay, a new episode
    second = world.tick(64)[1][0]
    assert first.type == second.type == "deal.stalled"
    assert first.id != second.id
    replay = World()
    replay.event("d1", 0, stage="lead")
    assert replay.tick(31)[1][0].id == first.id          # same episode, same id, any worker


def test_thresholds_are_per_stage(tmp_path):
    text = DEFAULT_CONFIG.read_text().replace("stall_after: 30d}", "stall_after: 2d}", 1)
    (tmp_path / "funnel.yaml").write_text(text)
    world = World(config=load_config(tmp_path / "funnel.yaml"))
    world.event("fast", 0, stage="lead")
    world.event("slow", 0, stage="mql")
    assert world.tick(3)[0] == [("deal.stalled", "fast", "lead")]
    assert world.tick(31)[0] == [("deal.stalled", "slow", "mql")]


def test_one_alert_per_episode_across_a_worker_restart():
    world = World()
    world.event("d1", 0, stage="sql")
    assert len(world.tick(31)[0]) == 1
    restarted = World(table=dict(world.table))           # recovered from the changelog
    restarted.clock.observe(BASE + 35 * DAY)
    assert restarted.tick()[0] == []
    assert restarted.event("d1", 36, deleted=True) == [("deal.unstalled", "d1", "sql")]


def test_an_event_that_keeps_the_stay_does_not_unstall():
    world = World()
    world.event("d1", 0, stage="opportunity", amount=10.0)
    world.tick(31)
    assert world.event("d1", 32, amount=12.0) == []


def test_a_tick_raises_at_most_its_cap_longest_stalled_first_and_the_rest_later():
    world = World()
    world.proc.max_stalls_per_check = 2
    for day, deal in enumerate(["d1", "d2", "d3", "d4", "d5"]):
        world.event(deal, 5 - day, stage="lead")        # d5 entered first, d1 last
    assert [a[1] for a in world.tick(40)[0]] == ["d5", "d4"]
    assert [a[1] for a in world.tick()[0]] == ["d3", "d2"]
    assert [a[1] for a in world.tick()[0]] == ["d1"]
    assert world.tick()[0] == []                         # each raised once
