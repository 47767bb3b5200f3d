"""Shared helpers of the adapter tests, and tests of the shared parsers and pipeline lookup."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from models.aggregates import deal_contribution
from models.config import ConfigError, load_config
from models.deal import Deal, Outcome, apply_change
from models.event import decode_event, encode_event
from models.fold import Fold
from streams.crm.sources.common import Context, Malformed, amount, from_epoch, from_iso, ident

FIXTURES = Path(__file__).parent / "fixtures"
CONFIG = load_config()  # the shipped funnel.yaml
CTX = Context(CONFIG).check()
NOW_MS = 1_900_000_000_000  # 2030: every fixture lies in the past
SKEW_MS = 86_400_000


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def apply(events: list[dict], deals: dict[str, Deal] | None = None) -> tuple[dict[str, Deal], list[Outcome]]:
    """Run canonical events through the deal agent's own steps: decode, map the stage with the
    shipped config (unmapped raises), apply. Returns the deals and each event's outcome."""
    deals = {} if deals is None else deals
    outcomes = []
    for event in events:
        change = decode_event(encode_event(event), now_ms=NOW_MS, max_skew_ms=SKEW_MS)
        deal = deals.setdefault(change.deal_id, Deal(change.deal_id))
        pipeline = change.pipeline or deal.value("pipeline") or "default"
        assert pipeline in CONFIG.pipelines, pipeline
        stage = None if change.stage is None else CONFIG.map_stage(change.source, pipeline, change.stage)
        outcomes.append(
            apply_change(deal, change, stage, stage_ignored=change.stage is not None and stage is None)
        )
    return deals, outcomes


def kpis(deals: dict[str, Deal]) -> dict[str, dict]:
    """The fold of the deals' contributions: what /metrics exports, as plain dicts."""
    return Fold.of(deal_contribution(deal, CONFIG) for deal in deals.values()).snapshot()["counters"]


def state(deal: Deal) -> tuple:
    """What a deal amounts to, independent of the order its events were applied in."""
    return (
        deal.value("pipeline"),
        deal.value("amount"),
        deal.value("currency"),
        deal.value("account"),
        deal.value("deleted"),
        deal.value("expected_close_at"),
        deal.owner,
        [(ts, stage) for ts, _, stage in deal.history],
    )


def assert_order_independent(events: list[dict], seed: int = 3) -> dict[str, Deal]:
    """Any arrival order, with every event delivered twice, gives the same deals."""
    deals, _ = apply(events)
    rng = random.Random(seed)
    for _ in range(5):
        shuffled = [*events, *events]
        rng.shuffle(shuffled)
        again, _ = apply(shuffled)
        assert {k: state(v) for k, v in again.items()} == {k: state(v) for k, v in deals.items()}
    return deals


def test_amount_accepts_numbers_and_plain_decimal_text_only():
    assert amount("2000", "x") == 2000.0
    assert amount("12.50", "x") == 12.5
    assert amount(7, "x") == 7
    for bad in (
        "1_000",
        " 12",
        "nan",
        "inf",
        "1e400",
        "-5",
        "",
        "12,5",
        True,
        None,
        [1],
        1e309,
        float("nan"),
        10**400,
        -1,
    ):
        with pytest.raises(Malformed):
            amount(bad, "x")


def test_timestamps_keep_their_instant_and_refuse_guesses():
    assert from_epoch(1556094637139, "x") == "2019-04-24T08:30:37.139Z"
    assert from_epoch("1727447128", "x", unit_ms=1000) == "2024-09-27T14:25:28.000Z"
    assert from_iso("2025-03-04T10:15:00.000Z", "x") == "2025-03-04T10:15:00.000Z"
    assert from_iso("2025-03-04T12:15:00+02:00", "x") == "2025-03-04T10:15:00.000Z"
    assert from_iso("2025-12-31", "x") == "2025-12-31T00:00:00.000Z"
    assert from_iso("2024-09-27 14:25:27", "x", naive_utc=True) == "2024-09-27T14:25:27.000Z"
    for bad in ("2024-09-27 14:25:27", "yesterday", "2024-13-01", 1.5, "9" * 100):
        with pytest.raises(Malformed):
            from_iso(bad, "x")
    for bad in (-1, True, 10**20, "12a", 1.0):
        with pytest.raises(Malformed):
            from_epoch(bad, "x")


def test_ids_are_bounded_text_without_blanks():
    assert ident(42, "x") == "42" and ident("006SM0000001Tb3YAE", "x") == "006SM0000001Tb3YAE"
    for bad in ("", "a b", "x" * 129, -1, True, 1.5, None, {"id": 1}, "tab\there"):
        with pytest.raises(Malformed):
            ident(bad, "x")


def test_a_stage_id_names_its_pipeline_only_when_unambiguous():
    assert CTX.pipeline_of("hubspot", "closedwon") == "default"
    assert CTX.pipeline_of("pipedrive", "3") == "default"
    assert CTX.pipeline_of("hubspot", "customer") is None  # lifecycle stages belong to people
    assert CTX.pipeline_of("hubspot", "3482933986") is None  # unknown: the deal agent decides
    assert CTX.pipeline_of("nosuchsource", "x") is None


def test_a_context_naming_an_unknown_pipeline_refuses_to_start():
    with pytest.raises(ConfigError, match="lifecycle"):
        Context(CONFIG, lifecycle_pipeline="people").check()
