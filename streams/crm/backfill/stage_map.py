"""``--print-stage-map``: ``stage_maps`` and ``owners`` blocks for the funnel config from the CRM.

Each CRM stage is mapped as the funnel config already maps its id (so a CRM's default pipeline
prints exactly the shipped map), else to the canonical stage of the same name, else by outcome
(closed won → the ``won`` stage, closed lost → the ``lost`` stage), else to the open stage whose
probability is nearest. The CRM's owners / users give the reps' display names, keyed by the
owner id exactly as the events carry it. The blocks are printed for the user to review and
paste: never written to a file.
"""

from __future__ import annotations

import json
import re

import yaml

from models.config import FunnelConfig, Pipeline
from streams.crm.backfill.common import CrmStage

_WORD = re.compile(r"[^a-z0-9]+")


def _norm(text: str) -> str:
    return _WORD.sub("", text.lower())


def canonical_pipeline(crm_pipeline: CrmStage, config: FunnelConfig) -> str:
    """The funnel pipeline named like the CRM pipeline (id or label), else ``default``."""
    for name in config.pipelines:
        if _norm(name) in (_norm(crm_pipeline.pipeline_id), _norm(crm_pipeline.pipeline_label)):
            return name
    return "default"


def canonical_stage(stage: CrmStage, pipeline: Pipeline, mapped: dict[str, str] | None = None
                    ) -> tuple[str, str]:
    """(canonical stage, why) for one CRM stage; ``mapped``: the config's map of this source and
    pipeline (stage id → canonical stage or ``ignore``)."""
    target = (mapped or {}).get(stage.stage_id)
    if target is not None and (target == "ignore" or target in pipeline.by_name):
        return target, "as in the funnel config"
    for candidate in pipeline.stages:
        if _norm(candidate.name) in (_norm(stage.label), _norm(stage.stage_id)):
            return candidate.name, "same name"
    if stage.closed:
        outcome = "won" if stage.won else "lost"
        for candidate in pipeline.stages:
            if candidate.outcome == outcome:
                return candidate.name, f"closed {outcome}"
    open_stages = [s for s in pipeline.stages if s.is_open]
    if stage.probability is None or not open_stages:
        return "ignore", "no probability: choose a stage"
    nearest = min(open_stages, key=lambda s: abs(s.probability - stage.probability))  # type: ignore[operator]
    return nearest.name, "nearest probability"


def yaml_quoted(text: str) -> str:
    """``text`` as one double-quoted YAML scalar: quotes, colons, ``#``, control characters and
    any unicode (an emoji too, which JSON would write as a surrogate pair YAML cannot read)."""
    return yaml.safe_dump(text, default_style='"', allow_unicode=True, width=float("inf")).rstrip("\n")


def render_owners(source: str, owners: dict[str, str]) -> str:
    """The ``owners`` block: owner id as the events carry it → the name the CRM shows."""
    lines = [f"# Display names of {source}'s owners, for the leaderboard (funnel_owner_info): put them",
             "# under owners in your funnel config. Events and KPIs keep the ids.",
             "owners:" if owners else "owners: {}"]
    lines += [f"  {yaml_quoted(owner)}: {yaml_quoted(name)}" for owner, name in owners.items()]
    return "\n".join(lines) + "\n"


def render(source: str, stages: list[CrmStage], owners: dict[str, str], config: FunnelConfig) -> str:
    """The YAML blocks, stage_maps then owners (JSON-quoted stage ids, YAML-quoted owners, so any
    stage id, label or name is valid YAML)."""
    lines = [f"# Stage map for {source} read from the CRM: review it, then put it under stage_maps in",
             "# your funnel config (FUNNEL_CONFIG). Nothing was written.",
             "stage_maps:", f"  {source}:"]
    by_pipeline: dict[str, list[tuple[CrmStage, str, str]]] = {}
    labels: dict[str, list[str]] = {}
    for stage in stages:
        name = canonical_pipeline(stage, config)
        mapped = config.stage_maps.get(source, {}).get(name)
        canonical, why = canonical_stage(stage, config.pipelines[name], mapped)
        by_pipeline.setdefault(name, []).append((stage, canonical, why))
        pipeline_label = f"{stage.pipeline_label} ({stage.pipeline_id})"
        if pipeline_label not in labels.setdefault(name, []):
            labels[name].append(pipeline_label)
    for name, entries in by_pipeline.items():
        lines.append(f"    {name}:  # CRM pipeline {', '.join(labels[name])}")
        for stage, canonical, why in entries:
            probability = "" if stage.probability is None else f", probability {stage.probability:g}"
            lines.append(f"      {json.dumps(stage.stage_id)}: {canonical}  # {json.dumps(stage.label)}"
                         f"{probability}: {why}")
    return "\n".join(lines) + "\n" + render_owners(source, owners)
