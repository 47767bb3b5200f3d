"""Realistic synthetic CRM traffic, reproducible from a seed.

Deals arrive over the last ``days`` days and walk the default funnel (lead → mql → sql →
opportunity → won/lost) with per-stage drop-offs and exponential stays; amounts are
log-normal, reps and accounts skewed (a few big ones). Like real CRM traffic it carries one
property per event, a few retried deliveries (same ``event_id``) and some late arrivals.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime

DAY_S = 86400.0
# (stage, probability of moving on, mean days in the stage before moving or dropping out)
FUNNEL = (("lead", 0.65, 4.0), ("mql", 0.6, 6.0), ("sql", 0.6, 8.0), ("opportunity", 0.45, 14.0))
REPS = ("Ava Moreno", "Ben Okafor", "Chen Wei", "Dana Kim", "Eli Novak", "Fatima Zahra",
        "Goran Petrovic", "Hana Sato", "Ivan Horvat", "Julia Rossi", "Kofi Mensah", "Lena Berg")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Simulation:
    seed: int = 7
    deals: int = 2000
    days: int = 120
    end: float | None = None           # epoch seconds; default: now
    duplicate_rate: float = 0.01
    late_rate: float = 0.02
    accounts: int = 80
    # Scripted leak for alert tests: from this epoch second on, mql → sql success is scaled.
    drop_from: float | None = None
    drop_factor: float = 1.0

    def events(self) -> list[dict]:
        """Events in send order: event-time order, with duplicates and late arrivals mixed in."""
        rng = random.Random(self.seed)
        end = self.end if self.end is not None else datetime.now(UTC).timestamp()
        start = end - self.days * DAY_S
        timeline: list[tuple[float, dict]] = []
        for number in range(self.deals):
            timeline.extend(self._deal(rng, number, start + rng.random() * (end - start), end))
        timeline.sort(key=lambda item: item[0])
        ordered = [event for _, event in timeline]
        for i in range(len(ordered)):
            if rng.random() < self.late_rate:  # delivered up to 50 positions late
                j = min(len(ordered) - 1, i + rng.randint(1, 50))
                ordered.insert(j, ordered.pop(i))
        sent: list[dict] = []
        for event in ordered:
            sent.append(event)
            if rng.random() < self.duplicate_rate:
                sent.append(dict(event))
        return sent

    def _deal(self, rng: random.Random, number: int, created: float, end: float):
        deal_id = f"sim:{self.seed}:{number}"
        counter = iter(range(1_000_000))

        def event(ts: float, **change: object) -> tuple[float, dict]:
            return ts, {
                "event_id": f"{deal_id}:{next(counter)}", "deal_id": deal_id,
                "occurred_at": _iso(ts), "source": "simulator", **change,
            }

        amount = round(rng.lognormvariate(8.3, 0.8), 2)
        rep = REPS[min(int(rng.paretovariate(1.2)) - 1, len(REPS) - 1)]
        account = f"Account {min(int(rng.paretovariate(0.9)), self.accounts):03d}"
        out = [
            event(created, stage="lead"),
            event(created + 1, amount=amount, currency="USD"),
            event(created + 2, owner=rep),
            event(created + 3, account=account),
        ]
        ts = created
        for stage, advance, mean_days in FUNNEL:
            ts += rng.expovariate(1 / mean_days) * DAY_S
            if ts > end:
                return out
            if stage == "mql" and self.drop_from is not None and ts >= self.drop_from:
                advance *= self.drop_factor
            if rng.random() >= advance:
                if stage in ("sql", "opportunity") or rng.random() < 0.3:
                    out.append(event(ts, stage="lost", amount=0.0))
                return out
            following = _next_stage(stage)
            out.append(event(ts, stage=following))
            if following == "opportunity":
                expected = ts + rng.uniform(10, 60) * DAY_S
                out.append(event(ts + 1, expected_close_at=_iso(expected),
                                 amount=round(amount * rng.uniform(0.8, 1.3), 2)))
        return out


def _next_stage(stage: str) -> str:
    names = [name for name, _, _ in FUNNEL] + ["won"]
    return names[names.index(stage) + 1]
