"""One set of kept dimension values for the whole fleet (docs/kpis.md, "Dimensions").

Ranked per worker, a value near the guard's cut could be kept by one worker and summed into
``other`` by another: its fleet-wide figures would be too low. So the fleet decides once: each
deals partial carries its partition's :func:`candidates` (deal counts of the values with the
most deals), the publisher sums them over every partition and keeps the values with the most
deals (:func:`fleet_kept`), it publishes that choice in each snapshot, and every worker adopts
its own fleet's (:class:`KeptValues`) and exports exactly those values, zeros included.
"""

from __future__ import annotations

from models.aggregates import NO_VALUE, unpack_dimension
from models.config import FunnelConfig
from models.dimensions import OTHER, value_limit
from models.snapshot import KpiSnapshot

# A partition sends the counts of its values with the most deals, this many times the values it
# would keep: a value is then left out of a partition's count only where more than four times
# the kept number of values have more deals than it, so only values far below the cut there are
# undercounted, and a partial stays small with 10,000 distinct values.
CANDIDATES_PER_KEPT = 4

# Per (pipeline, dimension): [pipeline, dimension, currencies seen, [[value, deals], ...]].
Candidates = list[list]
# Pipeline → dimension → the values kept, most deals first.
Kept = dict[str, dict[str, list[str]]]


def most_first(counts: dict[str, int]) -> list[tuple[str, int]]:
    """Values by deals, most first, ties by name: the one order of the partitions' candidates
    and of the fleet's choice."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def candidates(config: FunnelConfig, sums: dict[tuple, int]) -> Candidates:
    """A partition's part of the fleet's ranking, from its fold's ``DIMENSION`` sums: the
    currencies of each (pipeline, dimension) and the deal counts of its likeliest values (counted
    straight from the sums: every tick, for every partition)."""
    names = list(config.dimensions)
    deals: dict[tuple[str, str], dict[str, int]] = {}
    currencies: dict[tuple[str, str], set[str]] = {}
    for (pl, values, _, currency, _), packed in sums.items():
        if pl in config.pipelines and len(values) == len(names):  # else: another config's fold
            count = unpack_dimension(packed)[0]
            for name, value in zip(names, values, strict=True):
                currencies.setdefault((pl, name), {config.default_currency}).add(currency)
                per_value = deals.setdefault((pl, name), {})
                per_value[value] = per_value.get(value, 0) + count
    out = []
    for (pl, name), counts in deals.items():
        seen = sorted(currencies[(pl, name)])
        limit = value_limit(config, config.pipelines[pl], config.dimensions[name].max_values, len(seen))
        ranked = most_first({value: count for value, count in counts.items()
                             if value not in (NO_VALUE, OTHER) and count})
        out.append([pl, name, seen, [list(kv) for kv in ranked[:CANDIDATES_PER_KEPT * limit]]])
    return out


def fleet_kept(config: FunnelConfig, partials: list[Candidates | None]) -> Kept | None:
    """The publisher's choice, from the candidates of every partition's latest deals partial:
    per (pipeline, dimension) the values with the most deals summed, ties by name, limited like
    :func:`~models.dimensions.dimension_kpis` with the currencies of the whole fleet (no worker
    sees more, so none has less room). ``None`` without dimensions, or while a partial from a
    version before candidates is among them (the workers then rank their own values)."""
    present = [partial for partial in partials if partial is not None]
    if not config.dimensions or len(present) < len(partials):
        return None
    deals: dict[tuple[str, str], dict[str, int]] = {}
    currencies: dict[tuple[str, str], set[str]] = {}
    for partial in present:
        for pl, name, seen, counts in partial:
            currencies.setdefault((pl, name), set()).update(seen)
            summed = deals.setdefault((pl, name), {})
            for value, count in counts:
                summed[value] = summed.get(value, 0) + count
    out: Kept = {}
    for pl, pipeline in config.pipelines.items():
        for name, dimension in config.dimensions.items():
            seen = {config.default_currency} | currencies.get((pl, name), set())
            limit = value_limit(config, pipeline, dimension.max_values, len(seen))
            ranked = most_first(deals.get((pl, name), {}))
            out.setdefault(pl, {})[name] = [value for value, _ in ranked[:limit]]
    return out


class KeptValues:
    """The kept values of this worker's fleet, from its latest snapshot of each pipeline (the
    worker hands it only its own fleet's: :func:`streams.worker.app.own_fleet`)."""

    def __init__(self) -> None:
        self.by_pipeline: Kept = {}

    def adopt(self, snapshot: KpiSnapshot) -> None:
        """A snapshot without kept values (no dimensions, or a fleet in the middle of an
        upgrade) sends the workers back to ranking their own values."""
        self.by_pipeline[snapshot.pipeline] = snapshot.dimension_values_kept or {}

    def of(self, pipeline: str, dimension: str) -> list[str] | None:
        """The fleet's kept values, or ``None`` where it has not decided (rank locally)."""
        return self.by_pipeline.get(pipeline, {}).get(dimension)
