"""The deal state machine (docs/design.md §2): every case, in every arrival order."""

import itertools

import orjson
import pytest

from models.aggregates import (
    CLOSED,
    OPEN,
    OPEN_VALUE,
    REACHED,
    REP_WON,
    STAGE_DURATION,
    TIME_TO_CLOSE,
    WON_REVENUE,
    deal_contribution,
)
from models.config import load_config
from models.deal import Deal, Outcome, apply_change, decode_deal, encode_deal
from models.event import Change

CONFIG = load_config()
DAY = 86_400_000


def ev(event_id, day, **fields):
    return Change(event_id=event_id, ts=int(day * DAY), deal_id="d", **fields)


def apply(deal, change):
    stage = None
    ignored = False
    if change.stage is not None:
        stage = CONFIG.map_stage(change.source, "default", change.stage)
        ignored = stage is None
    return apply_change(deal, change, stage, stage_ignored=ignored)


def play(events):
    deal = Deal("d")
    outcomes = [apply(deal, e) for e in events]
    return deal, outcomes


def summary(deal):
    """What KPIs see of a deal, as a comparable value (order of items irrelevant)."""
    return sorted(deal_contribution(deal, CONFIG))


def values(deal, family):
    return {key: value for fam, key, value in deal_contribution(deal, CONFIG) if fam == family}


def assert_order_independent(events):
    """Every arrival order gives the same KPIs and the same field values."""
    results = set()
    for order in itertools.permutations(events):
        deal, _ = play(order)
        fields = tuple(deal.value(n) for n in ("amount", "currency", "account", "deleted"))
        results.add((tuple(summary(deal)), fields, deal.owner))
    assert len(results) == 1, results
    return play(events)[0]


def test_progression_to_won():
    deal = assert_order_independent([
        ev("a", 0, stage="lead", amount=100.0, owner="ann"),
        ev("b", 2, stage="mql"),
        ev("c", 5, stage="opportunity"),
        ev("d", 10, stage="won", amount=120.0),
    ])
    assert values(deal, CLOSED) == {("default", "won"): 1}
    assert values(deal, WON_REVENUE) == {("default", "USD"): 120_000_000}
    assert values(deal, TIME_TO_CLOSE) == {("default", "won"): 10 * DAY}
    assert values(deal, REP_WON) == {("default", "ann", "USD"): 120_000_000}
    assert set(values(deal, REACHED)) == {("default", s) for s in ("lead", "mql", "sql", "opportunity")}
    assert values(deal, OPEN) == {}


def test_duplicate_event_id_changes_nothing():
    deal, outcomes = play([ev("a", 0, stage="lead"), ev("a", 0, stage="lead"), ev("a", 5, stage="won")])
    assert outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE, Outcome.DUPLICATE]
    assert values(deal, OPEN) == {("default", "lead"): 1}


def test_older_amount_is_stale_and_newer_wins_in_any_order():
    deal = assert_order_independent([
        ev("a", 0, stage="lead", amount=50.0), ev("b", 3, amount=70.0), ev("c", 1, amount=60.0),
    ])
    assert deal.value("amount") == 70.0
    _, outcomes = play([ev("a", 0, stage="lead"), ev("b", 3, amount=70.0), ev("c", 1, amount=60.0)])
    assert outcomes[-1] is Outcome.STALE


def test_same_timestamp_ties_break_on_event_id():
    assert assert_order_independent([
        ev("a", 0, stage="lead", amount=1.0), ev("b", 0, amount=2.0), ev("c", 0, amount=3.0),
    ]).value("amount") == 3.0


def test_late_earlier_stage_entry_moves_the_first_entry_and_cycle_time():
    deal = assert_order_independent([
        ev("b", 5, stage="opportunity"), ev("c", 9, stage="won"), ev("a", 1, stage="lead"),
    ])
    assert values(deal, TIME_TO_CLOSE) == {("default", "won"): 8 * DAY}
    assert values(deal, STAGE_DURATION) == {("default", "lead"): 4 * DAY,
                                            ("default", "opportunity"): 4 * DAY}


def test_close_before_entry_counts_like_entry_before_close():
    deal = assert_order_independent([
        ev("close", 20, stage="Won", source="csv", amount=900.0),
        ev("entry", 2, stage="Engaging", source="csv", amount=1000.0, owner="bob", account="acme"),
    ])
    assert values(deal, WON_REVENUE) == {("default", "USD"): 900_000_000}
    assert values(deal, TIME_TO_CLOSE) == {("default", "won"): 18 * DAY}


def test_skip_ahead_reaches_the_stages_in_between():
    deal = assert_order_independent([ev("a", 0, stage="lead"), ev("b", 4, stage="opportunity")])
    assert set(values(deal, REACHED)) == {("default", s) for s in ("lead", "mql", "sql", "opportunity")}
    assert values(deal, OPEN) == {("default", "opportunity"): 1}


def test_regression_moves_back_but_keeps_what_was_reached():
    deal = assert_order_independent([
        ev("a", 0, stage="sql"), ev("b", 2, stage="opportunity"), ev("c", 4, stage="sql"),
    ])
    assert values(deal, OPEN) == {("default", "sql"): 1}
    assert ("default", "opportunity") in values(deal, REACHED)
    assert values(deal, STAGE_DURATION) == {("default", "sql"): 2 * DAY,
                                            ("default", "opportunity"): 2 * DAY}


def test_reopen_after_won_removes_revenue_and_reopens():
    deal = assert_order_independent([
        ev("a", 0, stage="opportunity", amount=10.0), ev("b", 3, stage="won"),
        ev("c", 6, stage="opportunity"),
    ])
    assert values(deal, WON_REVENUE) == {}
    assert values(deal, CLOSED) == {}
    assert values(deal, OPEN_VALUE) == {("default", "opportunity", "USD"): 10_000_000}


def test_delete_removes_from_every_kpi_and_restore_brings_it_back():
    events = [ev("a", 0, stage="won", amount=5.0), ev("b", 2, deleted=True)]
    assert summary(assert_order_independent(events)) == []
    restored = assert_order_independent([*events, ev("c", 4, deleted=False)])
    assert values(restored, WON_REVENUE) == {("default", "USD"): 5_000_000}


def test_amount_correction_after_close_changes_revenue():
    deal = assert_order_independent([
        ev("a", 0, stage="lead", amount=10.0), ev("b", 2, stage="won"), ev("c", 4, amount=8.0),
    ])
    assert values(deal, WON_REVENUE) == {("default", "USD"): 8_000_000}


def test_owner_change_after_close_keeps_the_credit_with_the_owner_at_close():
    deal = assert_order_independent([
        ev("a", 0, stage="lead", owner="ann", amount=10.0), ev("b", 2, stage="won"),
        ev("c", 4, owner="bob"),
    ])
    assert deal.owner == "bob"
    assert values(deal, REP_WON) == {("default", "ann", "USD"): 10_000_000}


def test_owner_change_before_close_moves_the_credit():
    deal = assert_order_independent([
        ev("a", 0, stage="lead", owner="ann", amount=10.0), ev("b", 1, owner="bob"),
        ev("c", 2, stage="won"),
    ])
    assert values(deal, REP_WON) == {("default", "bob", "USD"): 10_000_000}


def test_account_change_is_last_write_wins():
    deal = assert_order_independent([
        ev("a", 0, stage="won", account="acme"), ev("b", 3, account="globex"),
        ev("c", 1, account="initech"),
    ])
    assert deal.value("account") == "globex"


def test_ignored_stage_is_counted_as_ignored():
    config = CONFIG.model_copy(update={
        "stage_maps": {**CONFIG.stage_maps, "test": {"default": {"other": "ignore"}}},
    })
    deal = Deal("d")
    change = ev("a", 0, stage="other", source="test")
    stage = config.map_stage("test", "default", "other")
    assert stage is None
    assert apply_change(deal, change, stage, stage_ignored=True) is Outcome.IGNORED
    assert deal_contribution(deal, config) == ()


def test_unmapped_stage_is_refused_with_a_reason():
    with pytest.raises(KeyError, match=r"no entry in stage_maps\.hubspot\.default"):
        CONFIG.map_stage("hubspot", "default", "mystery")


def test_dedup_memory_is_bounded_but_stage_entries_still_dedup():
    deal = Deal("d")
    apply(deal, ev("first", 0, stage="lead"))
    for i in range(100):
        apply(deal, ev(f"amount-{i}", 1 + i / 1000, amount=float(i)))
    assert len(deal.recent_ids) == 32
    assert apply(deal, ev("first", 0, stage="lead")) is Outcome.DUPLICATE


def test_encode_decode_round_trip():
    deal, _ = play([ev("a", 0, stage="lead", amount=1.5, owner="ann", account="acme",
                       expected_close_at=5 * DAY), ev("b", 1, deleted=False)])
    deal.partition = 3
    deal.credited_accounts = ["acme"]
    assert decode_deal(encode_deal(deal)) == deal


def test_versions_are_stored_once_and_deals_in_the_first_format_still_read():
    deal, outcomes = play([ev("a", 1, stage="lead", amount=1.5, owner="ann", account="acme"),
                           ev("b", 2, stage="mql"), ev("c", 0.5, amount=1.0)])
    assert outcomes[2] is Outcome.STALE
    raw = encode_deal(deal)
    assert raw.count(b'"a"') == 1 and raw.count(b'"c"') == 1  # "c" only as a recent id
    assert decode_deal(raw) == deal
    first_format = orjson.dumps([
        1, deal.deal_id, deal.partition, None, [1.5, DAY, "a"], None, ["acme", DAY, "a"], None,
        None, [[DAY, "a", "lead"], [2 * DAY, "b", "mql"]], [[DAY, "a", "ann"]], ["a", "b", "c"],
        [], None,
    ])
    assert decode_deal(first_format) == deal
