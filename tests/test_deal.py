"""The deal state machine (docs/design.md §2): every case, in every arrival order."""

import bisect
import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import aggregates as agg
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
from models.config import FunnelConfig, load_config
from models.deal import (
    MAX_HISTORY,
    MAX_OWNERS,
    RECENT_IDS,
    SAME_CHANGE_MS,
    Deal,
    Field,
    Outcome,
    apply_change,
)
from models.deal_codec import decode_deal, encode_deal
from models.event import Change
from models.fold import Fold
from models.hourly import hist_of

CONFIG = load_config()
# The same funnel broken down by two properties; events may also carry one it does not name.
DIMENSIONS_CONFIG = FunnelConfig.model_validate(
    {**CONFIG.model_dump(), "dimensions": {"region": {}, "segment": {"max_values": 3}}})
KEPT = DIMENSIONS_CONFIG.kept_properties
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


# ---------------------------------------------------------------------------------------------
# The hot path was rewritten for speed (bench/domain.py): the state machine, contributions, the
# fold and the stored format must give exactly what the straightforward versions below (as they
# were before) give, for any deal.

HOUR = 3_600_000
STAGES = ("lead", "mql", "sql", "opportunity", "won", "lost", "nope")  # "nope": in no pipeline


def _reference_insert(entries, entry, cap):
    i = bisect.bisect_left(entries, entry)
    if i < len(entries) and entries[i][0] == entry[0] and entries[i][1] == entry[1]:
        return False
    ts, _, value = entry
    twins = [j for j in (i - 1, i) if 0 <= j < len(entries)
             and entries[j][2] == value and abs(entries[j][0] - ts) <= SAME_CHANGE_MS]
    if twins:
        latest = max(entry, *(entries[j] for j in twins))
        if latest is not entry and len(twins) == 1:
            return False
        for j in reversed(twins):
            del entries[j]
        entry = latest
        i = bisect.bisect_left(entries, entry)
    entries.insert(i, entry)
    if len(entries) > cap:
        del entries[1]
    return True


def _reference_apply_change(deal, change, stage, *, stage_ignored, keep=()):
    ts, eid = change.ts, change.event_id
    held = [deal.recent_ids, [e[1] for e in deal.history], [e[1] for e in deal.owners],
            [f.event_id for f in (deal.pipeline, deal.amount, deal.currency, deal.account,
                                  deal.expected_close_at, deal.deleted) if f is not None],
            [f.event_id for f in deal.properties.values()]]
    if any(eid in ids for ids in held):
        return Outcome.DUPLICATE
    changed = False
    for name in ("pipeline", "amount", "currency", "account", "expected_close_at", "deleted"):
        value = getattr(change, name)
        if value is None:
            continue
        current = getattr(deal, name)
        if current is None or (current.ts, current.event_id) < (ts, eid):
            setattr(deal, name, Field(value, ts, eid))
            changed = True
    if change.owner is not None:
        changed |= _reference_insert(deal.owners, (ts, eid, change.owner), MAX_OWNERS)
    if stage is not None:
        changed |= _reference_insert(deal.history, (ts, eid, stage), MAX_HISTORY)
    for name, value in (change.properties or {}).items():
        current = deal.properties.get(name)
        if name in keep and (current is None or (current.ts, current.event_id) < (ts, eid)):
            value = " ".join(value.split()).lower() if value else None
            deal.properties[name] = Field(value or None, ts, eid)
            changed = True
    deal.recent_ids.append(eid)
    if len(deal.recent_ids) > RECENT_IDS:
        del deal.recent_ids[0]
    if changed:
        return Outcome.ACCEPTED
    return Outcome.IGNORED if stage_ignored else Outcome.STALE


def _reference_contribution(deal, config):
    pl = deal.value("pipeline") or "default"
    pipeline = config.pipelines.get(pl)
    if deal.value("deleted") or pipeline is None:
        return ()
    stays, last = [], None
    for ts, _, stage in deal.history:
        if stage != last and stage in pipeline.by_name:
            stays.append((ts, stage))
            last = stage
    if not stays:
        return ()
    items = []
    entered, stage_name = stays[-1]
    stage = pipeline.by_name[stage_name]
    amount = agg.to_micro(deal.value("amount"))
    currency = deal.value("currency") or config.default_currency
    if stage.is_open:
        items.append((agg.OPEN, (pl, stage_name), 1))
        items.append((agg.OPEN_VALUE, (pl, stage_name, currency), amount))
        crm = deal.properties.get("forecast_category")
        category = config.forecast_category(pl, stage_name, crm.value if crm else None)
        items.append((agg.OPEN_DEALS, (pl, stage_name, currency, entered, deal.deal_id,
                                       deal.stall_alert == [stage_name, entered],
                                       deal.value("expected_close_at"), category), amount))
    else:
        outcome, cycle, hour = stage.outcome, entered - stays[0][0], entered // HOUR
        items += [(agg.CLOSED, (pl, outcome), 1), (agg.CLOSED_W, (pl, outcome, hour), 1),
                  (agg.TIME_TO_CLOSE, (pl, outcome), cycle),
                  (agg.TIME_TO_CLOSE_W, (pl, outcome, hour), cycle)]
        if outcome == "won":
            owner = deal.owner_at(entered) or ""
            items += [(agg.WON_REVENUE, (pl, currency), amount),
                      (agg.WON_REVENUE_W, (pl, currency, hour), amount),
                      (agg.WON_VALUE, (pl, currency), amount),
                      (agg.REP_WON, (pl, owner, currency), amount),
                      (agg.REP_WON_W, (pl, owner, currency, hour), amount)]
    reached_at = []
    for ts, name in stays:
        level = pipeline.open_index.get(name)
        if level is not None:
            while len(reached_at) <= level:
                reached_at.append(ts)
    for level, ts in enumerate(reached_at):
        name = pipeline.open_stages[level].name
        items += [(agg.REACHED, (pl, name), 1), (agg.REACHED_W, (pl, name, ts // HOUR), 1)]
    for (start, name), (end, _) in itertools.pairwise(stays):
        items.append((agg.STAGE_DURATION, (pl, name), end - start))
    furthest = pipeline.open_stages[len(reached_at) - 1].name if reached_at else ""
    cycle = 0 if stage.is_open else entered - stays[0][0]
    if config.dimensions:
        values = tuple(field.value if (field := deal.properties.get(name)) is not None
                       and field.value is not None else "none" for name in config.dimensions)
        items.append((agg.DIMENSION, (pl, values, stage_name, currency, furthest),
                      agg.pack_dimension(1, cycle, amount)))
    return tuple(items)


def _reference_encode(deal):
    refs, versions, fields = {}, [], []
    for current in (deal.pipeline, deal.amount, deal.currency, deal.account,
                    deal.expected_close_at, deal.deleted):
        if current is None:
            fields.append(None)
            continue
        if current.event_id not in refs:
            refs[current.event_id] = len(refs)
            versions += (current.ts, current.event_id)
        fields.append([current.value, refs[current.event_id]])
    entries = []
    for ts, eid, value in deal.history + deal.owners:
        if eid not in refs:
            refs[eid] = len(refs)
            versions += (ts, eid)
        entries.append([refs[eid], value])
    properties = {}
    for name, current in deal.properties.items():
        if current.event_id not in refs:
            refs[current.event_id] = len(refs)
            versions += (current.ts, current.event_id)
        properties[name] = [current.value, refs[current.event_id]]
    cut = len(deal.history)
    return orjson.dumps([2, deal.deal_id, deal.partition, versions, *fields, entries[:cut],
                         entries[cut:], [refs.get(eid, eid) for eid in deal.recent_ids],
                         deal.credited_accounts, deal.stall_alert,
                         *([properties] if properties else [])])


_PROPERTIES = st.one_of(st.none(), st.dictionaries(
    st.sampled_from(("region", "segment", "not_configured", "forecast_category")),
    st.one_of(st.none(), st.sampled_from(("EMEA", " emea ", "APAC", "", "Other", "NONE",
                                          "Best Case", "COMMIT", "omit"))),
    max_size=2))


def _events(draw_ids):
    """Changes on one deal, any order: few ids and close times, so duplicates, ties, stale
    values and twins (same value within SAME_CHANGE_MS) all happen."""
    return st.lists(st.builds(
        lambda eid, ts, stage, pipeline, amount, currency, owner, account, expected, deleted,
        properties:
        (Change(event_id=eid, ts=ts, deal_id="d", pipeline=pipeline, amount=amount,
                currency=currency, owner=owner, account=account, expected_close_at=expected,
                deleted=deleted, properties=properties), stage),
        st.sampled_from(draw_ids),
        st.one_of(st.integers(0, 40) .map(lambda n: n * 4_000), st.integers(0, 200 * HOUR)),
        st.one_of(st.none(), st.sampled_from(STAGES)),
        st.one_of(st.none(), st.none(), st.sampled_from(("default", "lifecycle", "other"))),
        st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False), st.just(0.0)),
        st.one_of(st.none(), st.sampled_from(("USD", "EUR"))),
        st.one_of(st.none(), st.sampled_from(("ann", "bob"))),
        st.one_of(st.none(), st.sampled_from(("acme", "globex"))),
        st.one_of(st.none(), st.integers(0, 400 * HOUR)),
        st.one_of(st.none(), st.none(), st.booleans()),
        _PROPERTIES,
    ), max_size=40)


EVENT_IDS = [f"e{i}" for i in range(30)]


def _played(changes, apply_fn=apply_change):
    deal = Deal("d", 1)
    outcomes = [apply_fn(deal, change, stage, stage_ignored=False, keep=KEPT)
                for change, stage in changes]
    return deal, outcomes


@settings(max_examples=300, deadline=None)
@given(_events(EVENT_IDS))
def test_state_machine_matches_the_straightforward_one(changes):
    deal, outcomes = _played(changes)
    reference, expected = _played(changes, _reference_apply_change)
    assert outcomes == expected
    assert deal == reference


def test_caps_on_owners_history_and_recent_ids_match_the_straightforward_one():
    changes = [(Change(event_id=f"e{i}", ts=i * 20_000, deal_id="d", owner=f"o{i % 3}"),
                STAGES[i % 4]) for i in range(150)]
    deal, outcomes = _played(changes)
    reference, expected = _played(changes, _reference_apply_change)
    assert outcomes == expected and deal == reference
    assert len(deal.owners) == MAX_OWNERS and len(deal.history) == MAX_HISTORY


@settings(max_examples=300, deadline=None)
@given(_events(EVENT_IDS), st.one_of(st.none(), st.sampled_from(STAGES)), st.integers(0, 3))
def test_contribution_matches_the_straightforward_one(changes, alerted_stage, pick):
    deal, _ = _played(changes)
    if alerted_stage is not None and deal.history:  # an alert for a stay, current or not
        deal.stall_alert = [alerted_stage, deal.history[pick % len(deal.history)][0]]
    assert deal_contribution(deal, CONFIG) == _reference_contribution(deal, CONFIG)
    assert (deal_contribution(deal, DIMENSIONS_CONFIG)
            == _reference_contribution(deal, DIMENSIONS_CONFIG))
    pl, stays = agg.stays_of(deal, CONFIG)
    reference = _reference_contribution(deal, CONFIG)
    open_items = [key for family, key, _ in reference if family == agg.OPEN_DEALS]
    assert agg.open_stay(deal, CONFIG) == ([open_items[0][1], open_items[0][3]] if open_items
                                           else None)
    assert pl == (deal.value("pipeline") or "default")
    assert not reference or stays[-1][0] == (open_items[0][3] if open_items else stays[-1][0])


def test_contribution_follows_a_copied_config():
    """Plans are kept per config: a copy with other stages gets its own."""
    deal, _ = play([ev("a", 0, stage="lead"), ev("b", 1, stage="mql")])
    assert values(deal, REACHED) == {("default", "lead"): 1, ("default", "mql"): 1}
    doc = CONFIG.model_dump()
    doc["pipelines"]["default"]["stages"] = [
        stage for stage in doc["pipelines"]["default"]["stages"] if stage["name"] != "mql"]
    doc["stage_maps"] = {}
    other = type(CONFIG).model_validate(doc)
    assert deal_contribution(deal, other) == _reference_contribution(deal, other)
    assert {k for f, k, _ in deal_contribution(deal, other) if f == REACHED} == {
        ("default", "lead")}
    assert values(deal, REACHED) == {("default", "lead"): 1, ("default", "mql"): 1}


@settings(max_examples=300, deadline=None)
@given(_events(EVENT_IDS), st.lists(st.sampled_from(("acme", "x")), max_size=3),
       st.one_of(st.none(), st.just(["lead", 5])), st.integers(-1, 7))
def test_stored_format_is_byte_for_byte_the_same(changes, credited, alert, partition):
    deal, _ = _played(changes)
    deal.credited_accounts, deal.stall_alert, deal.partition = credited, alert, partition
    raw = encode_deal(deal)
    assert raw == _reference_encode(deal)
    assert decode_deal(raw) == deal
    stored = orjson.loads(raw)
    padded = stored if len(stored) > 15 else [*stored, None]  # properties come 16th, or null
    longer = orjson.dumps([*padded, "a field of a later build"])
    assert decode_deal(longer) == deal  # read as before: by position, extra ignored
    assert decode_deal(orjson.dumps(stored[:15])).properties == {}  # as a build before them


def test_deal_and_field_read_and_compare_as_the_dataclasses_did():
    deal, _ = play([ev("a", 0, stage="lead", amount=1.5)])
    assert repr(deal) == (
        "Deal(deal_id='d', partition=-1, pipeline=None, amount=Field(value=1.5, ts=0, "
        "event_id='a'), currency=None, account=None, expected_close_at=None, deleted=None, "
        "history=[(0, 'a', 'lead')], owners=[], recent_ids=['a'], credited_accounts=[], "
        "stall_alert=None, properties={})")
    assert Deal("d") == Deal("d", -1) != Deal("e")
    assert Field(1, 2, "x") == Field(value=1, ts=2, event_id="x") != Field(1, 2, "y")
    with pytest.raises(TypeError):
        hash(Deal("d"))
    with pytest.raises(AttributeError):
        Deal("d").colour = "red"  # type: ignore[attr-defined]


# The fold: replace leaves alone what before and after share; apply and the kept window sums
# must still give what taking everything out and putting everything in gives.

NOW_HOUR = 150
WINDOW_RANGES = (("7d", NOW_HOUR - 20), ("30d", NOW_HOUR - 80), ("90d", NOW_HOUR - 140))
PERIOD_RANGES = (("month", NOW_HOUR - 50), ("year", 0), ("month", NOW_HOUR - 10))  # name twice


def _watched_fold():
    """A fold whose hourly families are kept summed per range, as after a scrape."""
    fold = Fold()
    for family in sorted(agg.HOURLY):
        fold.hourly_sums(family, WINDOW_RANGES, NOW_HOUR)
    fold.hourly_sums(agg.WON_REVENUE_W, PERIOD_RANGES, NOW_HOUR)
    return fold


def _plain(fold):
    """Everything a fold exports, as comparable data (window sums included)."""
    windows = {}
    for family in sorted(agg.HOURLY):
        for ranges in (WINDOW_RANGES, PERIOD_RANGES):
            sums = fold.hourly_sums(family, ranges, NOW_HOUR)
            windows[family, ranges] = {
                name: {labels: (value if isinstance(value, int)
                                else (list(value.counts), value.count, value.total))
                       for labels, value in part.items()}
                for name, part in sums.items()}
    return fold.snapshot(), windows


def _sums_from_buckets(fold, family, ranges):
    """The window sums read straight from every hour bucket (what a scrape did before)."""
    out = {name: {} for name, _ in ranges}
    if family in agg.HISTOGRAMS:
        for key, hist in fold.hists.get(family, {}).items():
            for name, first in ranges:
                if first <= key[-1] <= NOW_HOUR:
                    hist_of(out[name], key[:-1], len(hist.counts)).add(hist)
        return {name: {labels: (h.counts, h.count, h.total) for labels, h in part.items()}
                for name, part in out.items()}
    for key, value in fold.counters.get(family, {}).items():
        for name, first in ranges:
            if first <= key[-1] <= NOW_HOUR:
                out[name][key[:-1]] = out[name].get(key[:-1], 0) + value
    return {name: {labels: v for labels, v in part.items() if v} for name, part in out.items()}


deals_strategy = st.lists(_events(EVENT_IDS), min_size=1, max_size=6)


def _contributions(deal_changes):
    out = []
    for i, changes in enumerate(deal_changes):
        deal, _ = _played([(msgspec_replace(change, deal_id=f"d{i}"), stage)
                           for change, stage in changes])
        deal.deal_id = f"d{i}"
        out.append(deal_contribution(deal, CONFIG))
    return out


def msgspec_replace(change, **fields):
    import msgspec

    return msgspec.structs.replace(change, **fields)


@settings(max_examples=200, deadline=None)
@given(deals_strategy, _events(EVENT_IDS), st.booleans())
def test_replace_equals_taking_all_out_and_putting_all_in(deal_changes, more, watched):
    """Each deal moves from an earlier state (a prefix of its events) to a later one."""
    contributions = _contributions(deal_changes)
    later = _contributions([changes + more for changes in deal_changes])
    diffed = _watched_fold() if watched else Fold()
    whole = _watched_fold() if watched else Fold()
    for contribution in contributions:
        diffed.apply(contribution, 1)
        whole.apply(contribution, 1)
    for before, after in zip(contributions, later, strict=True):
        diffed.replace(before, after)
        whole.apply(before, -1)
        whole.apply(after, 1)
    assert _plain(diffed) == _plain(whole)
    assert _plain(diffed) == _plain(Fold.of(later))
    _assert_kept_sums_are_the_buckets_sums(diffed)


items_strategy = st.lists(st.tuples(
    st.sampled_from((agg.REACHED, agg.REACHED_W, agg.STAGE_DURATION, agg.TIME_TO_CLOSE_W)),
    st.sampled_from(("a", "b")), st.integers(NOW_HOUR - 150, NOW_HOUR + 2),
    st.integers(0, 3) .map(lambda n: n * DAY)), max_size=12)


def _items(drawn):
    return tuple((family, ("p", label, hour) if family in agg.HOURLY else ("p", label), value)
                 for family, label, hour, value in drawn)


@settings(max_examples=300, deadline=None)
@given(st.lists(items_strategy, max_size=4), items_strategy, items_strategy)
def test_replace_of_repeated_items_is_a_multiset_difference(others, before, after):
    """Items may repeat (a stage stayed in twice for as long): each copy counts."""
    before, after = _items(before), _items(after)
    diffed, whole = _watched_fold(), _watched_fold()
    for fold in (diffed, whole):
        for contribution in [*map(_items, others), before]:
            fold.apply(contribution, 1)
    diffed.replace(before, after)
    whole.apply(before, -1)
    whole.apply(after, 1)
    assert _plain(diffed) == _plain(whole)
    _assert_kept_sums_are_the_buckets_sums(diffed)


def _assert_kept_sums_are_the_buckets_sums(fold):
    for family in sorted(agg.HOURLY):
        for ranges in (WINDOW_RANGES, PERIOD_RANGES):
            kept = _plain(fold)[1][family, ranges]
            assert {name: {k: (list(v[0]), v[1], v[2]) if isinstance(v, tuple) else v
                           for k, v in part.items()} for name, part in kept.items()} == {
                name: {k: (list(v[0]), v[1], v[2]) if isinstance(v, tuple) else v
                       for k, v in part.items()}
                for name, part in _sums_from_buckets(fold, family, ranges).items()}


def test_a_reopened_deal_leaves_no_empty_histogram_in_the_window_sums():
    fold = _watched_fold()
    won, _ = play([ev("a", 0, stage="lead"), ev("b", 145 * HOUR / DAY, stage="won")])
    closed = deal_contribution(won, CONFIG)
    fold.apply(closed, 1)
    assert fold.hourly_sums(agg.TIME_TO_CLOSE_W, WINDOW_RANGES, NOW_HOUR)["7d"]
    apply(won, ev("c", 146 * HOUR / DAY, stage="opportunity"))
    fold.replace(closed, deal_contribution(won, CONFIG))
    assert fold.hourly_sums(agg.TIME_TO_CLOSE_W, WINDOW_RANGES, NOW_HOUR) == {
        "7d": {}, "30d": {}, "90d": {}}
    assert fold.hourly_sums(agg.CLOSED_W, WINDOW_RANGES, NOW_HOUR) == {
        "7d": {}, "30d": {}, "90d": {}}
    _assert_kept_sums_are_the_buckets_sums(fold)
