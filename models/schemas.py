"""JSON Schemas of the messages other services rely on, generated from the pydantic models.

``python -m models.schemas`` rewrites ``schemas/``; a test fails when the committed files are not
what the models produce. File names carry the schema version: a breaking change bumps it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from models.alerts import ALERT_SCHEMA_VERSION, Alert
from models.event import SCHEMA_VERSION, CrmEvent
from models.snapshot import SNAPSHOT_SCHEMA_VERSION, KpiSnapshot

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
MESSAGES: dict[str, tuple[type[BaseModel], int, str]] = {
    "crm-event": (CrmEvent, SCHEMA_VERSION, "crm.events"),
    "kpi-snapshot": (KpiSnapshot, SNAPSHOT_SCHEMA_VERSION, "funnel.kpis"),
    "alert": (Alert, ALERT_SCHEMA_VERSION, "funnel.alerts"),
}


def render() -> dict[str, str]:
    files = {}
    for name, (model, version, topic) in MESSAGES.items():
        schema = model.model_json_schema(mode="serialization" if name != "crm-event" else "validation")
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://funnel-kpi.invalid/schemas/{name}.v{version}.json",
            "description": f"{schema.pop('description', '')} Topic: {topic}.".strip(),
            **schema,
        }
        files[f"{name}.v{version}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def main() -> int:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for filename, text in render().items():
        (SCHEMA_DIR / filename).write_text(text)
        print(f"wrote schemas/{filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
