#!/usr/bin/env python3
"""Generate the provisioned Grafana boards (grafana/dashboards/*.json) from one definition.

    python grafana/generate.py          # rewrite the JSON files
    python grafana/generate.py --check  # exit 1 if a committed file differs from the output

Why code: five boards share the data source, the `pipeline` and `window` variables, units, the
stage-ordering join and the layout grid; writing them once here keeps them consistent. Panels
query the recording rules of prometheus/rules/funnel_recording.yml wherever a KPI is derived
(ratios and averages are never re-derived in a panel), and raw contract metrics (docs/design.md §3)
otherwise. KPI panels read the `_held` twins of the recording rules: during a rebalance they keep
the last complete value (at most 120 s) instead of going blank, and every board opens with how
old the values are ("KPIs as of", "KPI age"); alerts read the exact series. No query pads with
`or vector(0)`: a KPI without data shows "No data".

Standard library only. The JSON validates against Grafana's dashboard schema as encoded by
grafana-foundation-sdk (tests/test_ops_dashboards.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"

DATASOURCE_UID = "funnel-prometheus"  # = grafana/provisioning/datasources/prometheus.yml
DS = {"type": "prometheus", "uid": DATASOURCE_UID}
SCHEMA_VERSION = 41  # Grafana 11.6 (docker-compose.yml pins grafana/grafana:11.6.0)
TAG = "funnel-kpi"
WINDOWS = ("7d", "30d", "90d")

P = 'pipeline="$pipeline"'
PW = 'pipeline="$pipeline", window="$window"'

# KPI panels read the recording rules' `_held` twins (prometheus/rules/funnel_recording.yml): the
# last complete value during a rebalance, for at most HOLD_SECONDS, then absent. The exact series
# stay for alerts and for rates (a derivative over a held plateau would invent a flat stretch).
AS_OF = "fleet:funnel_kpis_as_of:timestamp"
HOLD_SECONDS = 120

# Stage order for bar gauges: join the position (funnel_stage_index) as label `idx`, return a
# table and sort its rows by idx (no stage name is written in a query).
STAGE_IDX = 'count_values by (pipeline, stage) ("idx", pipeline_stage:funnel_stage_index:max{' + P + "})"


def by_stage_order(expr: str) -> str:
    return f"{expr}\n* on (pipeline, stage) group_left (idx)\n{STAGE_IDX}"


class Board:
    """Flow layout on Grafana's 24-column grid."""

    def __init__(self, uid: str, title: str, description: str):
        self.uid, self.title, self.description = uid, title, description
        self.panels: list[dict] = []
        self.variables: list[dict] | None = None  # None: variables() (pipeline, window)
        self._x = self._y = self._row_h = 0
        self._id = 0

    def _place(self, w: int, h: int) -> dict:
        if self._x + w > 24:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        pos = {"h": h, "w": w, "x": self._x, "y": self._y}
        self._x += w
        self._row_h = max(self._row_h, h)
        return pos

    def _next_id(self) -> int:
        self._id += 1
        return self._id

    def row(self, title: str) -> None:
        if self._x:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        self.panels.append(
            {
                "type": "row",
                "id": self._next_id(),
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
                "panels": [],
            }
        )
        self._y += 1

    def panel(
        self,
        kind: str,
        title: str,
        targets: list[dict],
        *,
        description: str,
        unit: str = "short",
        w: int = 8,
        h: int = 8,
        decimals: int | None = None,
        options: dict | None = None,
        transformations: list[dict] | None = None,
        display_name: str | None = None,
        thresholds: list[tuple[str, float | None]] | None = None,
    ) -> None:
        defaults: dict = {"unit": unit}
        if thresholds is not None:
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [{"color": color, "value": value} for color, value in thresholds],
            }
        if decimals is not None:
            defaults["decimals"] = decimals
        if display_name is not None:
            defaults["displayName"] = display_name
        if unit == "percentunit":
            defaults["min"] = 0
            defaults["max"] = 1
        panel = {
            "type": kind,
            "id": self._next_id(),
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": self._place(w, h),
            "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options or OPTIONS[kind](),
        }
        if transformations:
            panel["transformations"] = transformations
        self.panels.append(panel)

    def to_json(self, variables: list[dict]) -> dict:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": [TAG],
            "timezone": "utc",
            "editable": False,
            "graphTooltip": 1,
            "time": {"from": "now-24h", "to": "now"},
            "refresh": "30s",
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "links": [
                {
                    "title": "Funnel boards",
                    "type": "dashboards",
                    "tags": [TAG],
                    "asDropdown": False,
                    "includeVars": True,
                    "keepTime": True,
                    "targetBlank": False,
                    "icon": "dashboard",
                    "tooltip": "",
                    "url": "",
                }
            ],
            "annotations": {"list": []},
            "templating": {"list": variables},
            "panels": self.panels,
        }


# ------------------------------------------------------------------ queries and panel options
def instant(expr: str, legend: str = "__auto", fmt: str = "time_series") -> dict:
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "instant": True,
        "range": False,
        "format": fmt,
    }


def series(expr: str, legend: str = "__auto") -> dict:
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "instant": False,
        "range": True,
        "format": "time_series",
    }


def _reduce(values: bool = False, fields: str = "") -> dict:
    return {"calcs": ["lastNotNull"], "fields": fields, "values": values}


def stat_options() -> dict:
    return {
        "reduceOptions": _reduce(),
        "colorMode": "value",
        "graphMode": "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "textMode": "value_and_name",
        "wideLayout": True,
        "showPercentChange": False,
    }


def bargauge_options(values: bool = False) -> dict:
    return {
        "reduceOptions": _reduce(values, "/^Value/" if values else ""),
        "orientation": "horizontal",
        "displayMode": "gradient",
        "valueMode": "color",
        "namePlacement": "left",
        "showUnfilled": True,
        "sizing": "auto",
    }


def timeseries_options() -> dict:
    return {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


def table_options() -> dict:
    return {"showHeader": True, "cellHeight": "sm"}


OPTIONS = {
    "stat": stat_options,
    "bargauge": bargauge_options,
    "timeseries": timeseries_options,
    "table": table_options,
}

# Bar gauge in stage order: table rows sorted by idx, one bar per row, named by stage.
ORDERED = {
    "options": bargauge_options(values=True),
    "transformations": [
        {
            "id": "convertFieldType",
            "options": {"conversions": [{"targetField": "idx", "destinationType": "number"}], "fields": {}},
        },
        {"id": "sortBy", "options": {"fields": {}, "sort": [{"field": "idx", "desc": False}]}},
    ],
}


def ordered_stage_panel(
    board: Board, title: str, expr: str, *, description: str, name: str = "${__data.fields.stage}", **kw
) -> None:
    board.panel(
        "bargauge",
        title,
        [instant(by_stage_order(expr), fmt="table")],
        description=description,
        display_name=name,
        options=ORDERED["options"],
        transformations=ORDERED["transformations"],
        **kw,
    )


def freshness(board: Board) -> None:
    """How old the KPIs on the board are: first on every board, above the first row."""
    board.panel(
        "stat",
        "KPIs as of",
        [instant(f"{AS_OF} * 1000", "as of")],
        description="When the KPIs on this board were computed: the last rule evaluation at "
        "which every partition was exported by exactly one worker "
        f"({AS_OF}). During a rebalance the KPI panels keep the values of that time, "
        f"for at most {HOLD_SECONDS} s; then they show No data until every partition is "
        "exported again.",
        unit="dateTimeAsIso",
        w=12,
        h=3,
    )
    board.panel(
        "stat",
        "KPI age",
        [instant(f"time() - {AS_OF}", "age")],
        description="Seconds since the KPIs on this board were computed. Up to one rule "
        "evaluation interval (15 s) when current; growing while a rebalance holds the last "
        f"complete values (orange from 30 s); past {HOLD_SECONDS} s (red) the KPI panels show "
        "No data.",
        unit="s",
        decimals=0,
        w=12,
        h=3,
        thresholds=[("green", None), ("orange", 30), ("red", HOLD_SECONDS)],
    )


def hide_columns(*names: str) -> dict:
    return {"id": "organize", "options": {"excludeByName": dict.fromkeys(names, True)}}


def money(level: str, kpi: str, selector: str = P) -> str:
    """A money total in the reporting currency when the funnel config names one (the
    ``funnel_reporting_*`` rule: every currency converted), else one row per native currency:
    ``or on (pipeline)`` keeps the native rows only for a pipeline without converted ones, so a
    panel never adds two currencies."""
    return (f"{level}:funnel_reporting_{kpi}_held{{{selector}}}\n"
            f"or on (pipeline) {level}:funnel_{kpi}_held{{{selector}}}")


STAGE_CURRENCY = "${__data.fields.stage} (${__data.fields.currency})"


# ------------------------------------------------------------------ variables
def pipeline_variable() -> dict:
    return {
        "type": "query",
        "name": "pipeline",
        "label": "Pipeline",
        "description": "Funnel pipeline (funnel config)",
        "datasource": DS,
        "query": "label_values(funnel_deals_open, pipeline)",
        "refresh": 2,
        "sort": 1,
        "multi": False,
        "includeAll": False,
        "current": {"text": "default", "value": "default"},
        "options": [],
        "hide": 0,
    }


def variables() -> list[dict]:
    return [
        pipeline_variable(),
        {
            "type": "custom",
            "name": "window",
            "label": "Window",
            "description": "Trailing window of the *_window metrics",
            "query": ",".join(WINDOWS),
            "multi": False,
            "includeAll": False,
            "current": {"text": "30d", "value": "30d"},
            "options": [{"text": w, "value": w, "selected": w == "30d"} for w in WINDOWS],
            "hide": 0,
        },
    ]


# The dimension board (funnel config `dimensions`): one dimension at a time, its values side by
# side. `dimension` lists the dimensions the guard reports for the pipeline, `value` the values
# exported for that dimension (the kept ones, `none`, `other`), `currency` the currencies of its
# won revenue: money panels show one currency, never a sum of two.
DIMENSION_GUARD = "pipeline_dimension:funnel_dimension_values:max"
DIMENSION_VALUES = "pipeline_dimension_value_stage:funnel_dimension_deals_reached:sum_held"
DIMENSION_CURRENCIES = "pipeline_dimension_value_currency:funnel_dimension_won_revenue:sum_held"
PD = 'pipeline="$pipeline", dimension="$dimension"'
PDV = PD + ', value=~"$value"'


def query(name: str, label: str, description: str, expr: str, **kw) -> dict:
    """A variable whose values a label_values() query lists (refreshed with the time range)."""
    return {
        "type": "query",
        "name": name,
        "label": label,
        "description": description,
        "datasource": DS,
        "query": expr,
        "refresh": 2,
        "sort": 1,
        "multi": False,
        "includeAll": False,
        "current": {},
        "options": [],
        "hide": 0,
        **kw,
    }


def dimension_variables() -> list[dict]:
    return [
        pipeline_variable(),
        query("dimension", "Dimension", "Deal property the KPIs are broken down by (funnel config "
              "`dimensions`)", f'label_values({DIMENSION_GUARD}{{pipeline="$pipeline"}}, dimension)'),
        query("value", "Value", "Values of the dimension to compare: the kept values, none (deals "
              "without one) and other (the values beyond the limit)",
              f"label_values({DIMENSION_VALUES}{{{PD}}}, value)", multi=True, includeAll=True,
              current={"text": ["All"], "value": ["$__all"]}),
        query("currency", "Currency", "Currency of the money panels (one at a time)",
              f"label_values({DIMENSION_CURRENCIES}{{{PD}}}, currency)"),
    ]


# The revenue board's forecast by category: one calendar period and one currency at a time (a sum
# over currencies would add dollars to euros).
FORECAST = "pipeline_category_currency_period:funnel_forecast_value:sum_held"
PERIODS = ("month", "quarter", "year")
PCP = 'pipeline="$pipeline", currency="$currency", period="$period"'


def forecast_variables() -> list[dict]:
    return [
        {
            "type": "custom",
            "name": "period",
            "label": "Period",
            "description": "Current calendar period of the forecast by category",
            "query": ",".join(PERIODS),
            "multi": False,
            "includeAll": False,
            "current": {"text": "quarter", "value": "quarter"},
            "options": [{"text": p, "value": p, "selected": p == "quarter"} for p in PERIODS],
            "hide": 0,
        },
        query("currency", "Currency", "Currency of the forecast by category and the value "
              "distributions (one at a time: their buckets are amounts)",
              f'label_values({FORECAST}{{pipeline="$pipeline"}}, currency)'),
    ]


# ------------------------------------------------------------------ boards
def overview() -> Board:
    b = Board(
        "funnel-overview",
        "Funnel overview",
        "Deals per stage as a funnel, stage conversion, win rate, pipeline value and weighted "
        "pipeline, by TOFU / MOFU / BOFU section.",
    )
    freshness(b)
    b.row("Headline")
    b.panel(
        "stat",
        "Open deals",
        [instant(f"pipeline:funnel_deals_open:sum_held{{{P}}}", "open")],
        description="Deals currently in an open stage.",
        w=4,
        h=5,
    )
    b.panel(
        "stat",
        "Pipeline value",
        [instant(money("pipeline_currency", "open_value:sum"), "{{currency}}")],
        description="Sum of the amounts of open deals (in the reporting currency when one is "
        "configured, else per currency).",
        w=4,
        h=5,
    )
    b.panel(
        "stat",
        "Weighted pipeline",
        [instant(money("pipeline_currency", "weighted_open_value:sum"), "{{currency}}")],
        description="Σ open value × stage probability (funnel config), in the reporting currency "
        "when one is configured.",
        w=4,
        h=5,
    )
    b.panel(
        "stat",
        "Win rate (all time)",
        [instant(f"pipeline:funnel_win_rate:ratio_held{{{P}}}", "win rate")],
        description="won / (won + lost), deals currently closed.",
        unit="percentunit",
        decimals=2,
        w=4,
        h=5,
    )
    b.panel(
        "stat",
        "Win rate ($window)",
        [instant(f"pipeline_window:funnel_win_rate:ratio_held{{{PW}}}", "win rate")],
        description="won / (won + lost) among deals closed within the window.",
        unit="percentunit",
        decimals=2,
        w=4,
        h=5,
    )
    b.panel(
        "stat",
        "Closed deals",
        [instant(f"pipeline_outcome:funnel_deals_closed:sum_held{{{P}}}", "{{outcome}}")],
        description="Deals currently won and lost.",
        w=4,
        h=5,
    )

    b.row("Funnel")
    ordered_stage_panel(
        b,
        "Funnel: deals that reached each stage",
        f"pipeline_stage:funnel_deals_reached:sum_held{{{P}}}",
        description="Deals that reached the stage or a later one (the conversion basis), in stage order.",
        w=8,
        h=9,
    )
    ordered_stage_panel(
        b,
        "Stage conversion (all time)",
        f"pipeline_stage:funnel_stage_conversion:ratio_held{{{P}}}",
        name="${__data.fields.stage} → ${__data.fields.next_stage}",
        description="reached(k+1) / reached(k) for consecutive open stages.",
        unit="percentunit",
        decimals=2,
        w=8,
        h=9,
    )
    ordered_stage_panel(
        b,
        "Stage conversion ($window)",
        f"pipeline_stage_window:funnel_stage_conversion:ratio_held{{{PW}}}",
        name="${__data.fields.stage} → ${__data.fields.next_stage}",
        description="Conversion among stage entries within the window.",
        unit="percentunit",
        decimals=2,
        w=8,
        h=9,
    )
    b.panel(
        "timeseries",
        "Stage conversion over time ($window)",
        [
            series(
                f"pipeline_stage_window:funnel_stage_conversion:ratio_held{{{PW}}}",
                "{{stage}} → {{next_stage}}",
            )
        ],
        description="Windowed stage conversion as it evolves; a falling line is a leak.",
        unit="percentunit",
        w=12,
        h=8,
    )
    b.panel(
        "timeseries",
        "Win rate over time",
        [
            series(f"pipeline:funnel_win_rate:ratio_held{{{P}}}", "all time"),
            series(f"pipeline_window:funnel_win_rate:ratio_held{{{PW}}}", "$window"),
        ],
        description="All-time and windowed win rate.",
        unit="percentunit",
        w=12,
        h=8,
    )

    sections = (
        ("TOFU", "TOFU — interest (open stages)"),
        ("MOFU", "MOFU — decision (open stages)"),
    )
    for section, row_title in sections:
        sel = f'pipeline_stage:funnel_stage_info:max{{{P}, section="{section}"}}'
        b.row(row_title)
        ordered_stage_panel(
            b,
            f"{section} open deals",
            f"(pipeline_stage:funnel_deals_open:sum_held{{{P}}} and on (pipeline, stage) {sel})",
            description=f"Open deals per stage of the {section} section.",
            w=8,
            h=7,
        )
        ordered_stage_panel(
            b,
            f"{section} open value",
            f"(({money('pipeline_stage_currency', 'open_value:sum')})"
            f" and on (pipeline, stage) {sel})",
            name=STAGE_CURRENCY,
            description=f"Open value per stage of the {section} section (reporting currency when "
            "configured, else per currency).",
            w=8,
            h=7,
        )
        ordered_stage_panel(
            b,
            f"{section} conversion to the next stage",
            f"(pipeline_stage:funnel_stage_conversion:ratio_held{{{P}}} and on (pipeline, stage) {sel})",
            name="${__data.fields.stage} → ${__data.fields.next_stage}",
            description=f"All-time conversion out of each {section} stage.",
            unit="percentunit",
            decimals=2,
            w=8,
            h=7,
        )
    b.row("BOFU — action (closed stages)")
    bofu = (
        "label_replace(pipeline_stage:funnel_stage_info:max{" + P + ', section="BOFU"}, '
        '"outcome", "$1", "stage", "(.+)")'
    )
    b.panel(
        "bargauge",
        "BOFU closed deals",
        [
            instant(
                f"pipeline_outcome:funnel_deals_closed:sum_held{{{P}}}\nand on (pipeline, outcome) {bofu}",
                "{{outcome}}",
            )
        ],
        description="Deals currently in the closed stages of the BOFU section.",
        w=8,
        h=7,
    )
    b.panel(
        "stat",
        "BOFU won revenue",
        [instant(money("pipeline_currency", "won_revenue:sum"), "{{currency}}")],
        description="Amounts of won deals (in the reporting currency when configured).",
        w=8,
        h=7,
    )
    b.panel(
        "stat",
        "BOFU win rate ($window)",
        [instant(f"pipeline_window:funnel_win_rate:ratio_held{{{PW}}}", "win rate")],
        description="Win rate of deals closed within the window.",
        unit="percentunit",
        decimals=2,
        w=8,
        h=7,
    )

    b.row("Pipeline value by stage")
    ordered_stage_panel(
        b,
        "Open value by stage",
        money("pipeline_stage_currency", "open_value:sum"),
        name=STAGE_CURRENCY,
        description="Amounts of open deals per stage: in the reporting currency (every currency "
        "converted at the rate in force) when one is configured, else one bar per currency.",
        w=12,
        h=8,
    )
    ordered_stage_panel(
        b,
        "Weighted open value by stage",
        money("pipeline_stage_currency", "weighted_open_value:sum"),
        name=STAGE_CURRENCY,
        description="Open value × stage probability, per stage (reporting currency when "
        "configured, else per currency).",
        w=12,
        h=8,
    )
    return b


def velocity() -> Board:
    b = Board(
        "funnel-velocity",
        "Funnel velocity",
        "Sales cycle and time in stage (averages and percentiles from the gauge histograms), "
        "sales velocity and stage entries over time.",
    )
    won = 'outcome="won"'
    freshness(b)
    b.row("Cycle and velocity")
    b.panel(
        "stat",
        "Average sales cycle (won, all time)",
        [instant(f"pipeline_outcome:funnel_time_to_close_seconds:avg_held{{{P}, {won}}}", "won")],
        description="Mean time from first stage entry to close, won deals.",
        unit="s",
        w=6,
        h=5,
    )
    b.panel(
        "stat",
        "Average sales cycle (won, $window)",
        [
            instant(
                f"pipeline_outcome_window:funnel_time_to_close_window_seconds:avg_held{{{PW}, {won}}}", "won"
            )
        ],
        description="Mean cycle of deals won within the window.",
        unit="s",
        w=6,
        h=5,
    )
    b.panel(
        "stat",
        "Sales velocity per day (all time)",
        [
            instant(
                f"pipeline_currency:funnel_sales_velocity:per_second_held{{{P}}} * 86400", "{{currency}}/day"
            )
        ],
        description="open deals × average deal size × win rate / average won cycle.",
        w=6,
        h=5,
    )
    b.panel(
        "stat",
        "Sales velocity per day ($window)",
        [
            instant(
                f"pipeline_currency_window:funnel_sales_velocity:per_second_held{{{PW}}} * 86400",
                "{{currency}}/day",
            )
        ],
        description="Velocity with the window's deal size, win rate and cycle.",
        w=6,
        h=5,
    )
    b.panel(
        "timeseries",
        "Sales cycle percentiles (all time)",
        [
            series(f"pipeline_outcome:funnel_time_to_close_seconds:p50_held{{{P}}}", "p50 {{outcome}}"),
            series(f"pipeline_outcome:funnel_time_to_close_seconds:p90_held{{{P}}}", "p90 {{outcome}}"),
            series(f"pipeline_outcome:funnel_time_to_close_seconds:avg_held{{{P}}}", "avg {{outcome}}"),
        ],
        description="Time to close of closed deals: median, 90th percentile and mean.",
        unit="s",
        w=12,
        h=8,
    )
    b.panel(
        "timeseries",
        "Sales cycle percentiles ($window)",
        [
            series(
                f"pipeline_outcome_window:funnel_time_to_close_window_seconds:p50_held{{{PW}}}",
                "p50 {{outcome}}",
            ),
            series(
                f"pipeline_outcome_window:funnel_time_to_close_window_seconds:p90_held{{{PW}}}",
                "p90 {{outcome}}",
            ),
            series(
                f"pipeline_outcome_window:funnel_time_to_close_window_seconds:avg_held{{{PW}}}",
                "avg {{outcome}}",
            ),
        ],
        description="Cycle of deals closed within the window.",
        unit="s",
        w=12,
        h=8,
    )
    b.panel(
        "timeseries",
        "Sales velocity over time",
        [
            series(
                f"pipeline_currency:funnel_sales_velocity:per_second_held{{{P}}} * 86400",
                "all time {{currency}}/day",
            ),
            series(
                f"pipeline_currency_window:funnel_sales_velocity:per_second_held{{{PW}}} * 86400",
                "$window {{currency}}/day",
            ),
        ],
        description="Expected revenue per day from the current pipeline.",
        w=24,
        h=8,
    )

    b.row("Time in stage")
    ordered_stage_panel(
        b,
        "Average time in stage",
        f"pipeline_stage:funnel_stage_duration_seconds:avg_held{{{P}}}",
        description="Mean of completed stays per stage.",
        unit="s",
        w=8,
        h=8,
    )
    ordered_stage_panel(
        b,
        "90th percentile time in stage",
        f"pipeline_stage:funnel_stage_duration_seconds:p90_held{{{P}}}",
        description="90% of completed stays were shorter than this.",
        unit="s",
        w=8,
        h=8,
    )
    ordered_stage_panel(
        b,
        "Average stay / stall threshold",
        f"pipeline_stage:funnel_stage_duration_per_stall_after:ratio_held{{{P}}}",
        description="Average completed stay divided by the stage's stall_after (config); "
        "above 100% the typical deal would be flagged as stalled.",
        unit="percentunit",
        w=8,
        h=8,
    )

    b.row("Stage entries")
    b.panel(
        "timeseries",
        "Stage entries per hour",
        [
            series(
                f"deriv(pipeline_stage:funnel_deals_reached:sum{{{P}}}[$__rate_interval]) * 3600", "{{stage}}"
            )
        ],
        description="Rate at which deals reach each stage (derivative of the reached "
        "gauge; negative after deletes or regressions).",
        w=12,
        h=8,
    )
    ordered_stage_panel(
        b,
        "Stage entries ($window)",
        f"pipeline_stage_window:funnel_deals_reached_window:sum_held{{{PW}}}",
        description="Deals that entered the stage (or a later one) within the window.",
        w=12,
        h=8,
    )
    return b


def revenue() -> Board:
    b = Board(
        "funnel-revenue",
        "Funnel revenue",
        "Won revenue against targets, forecast by category, average deal size, deal value "
        "distribution, sales leaderboard and customer lifetime value.",
    )
    b.variables = variables() + forecast_variables()
    freshness(b)
    b.row("Revenue")
    b.panel(
        "stat",
        "Won revenue (all time)",
        [instant(money("pipeline_currency", "won_revenue:sum"), "{{currency}}")],
        description="Amounts of deals currently won; in the reporting currency when one is "
        "configured (each at its close date's rate).",
        w=6,
        h=5,
    )
    b.panel(
        "stat",
        "Won revenue ($window)",
        [instant(money("pipeline_currency_window", "won_revenue_window:sum", PW), "{{currency}}")],
        description="Amounts of deals won within the window (reporting currency when configured).",
        w=6,
        h=5,
    )
    b.panel(
        "stat",
        "Average deal size (all time)",
        [instant(f"pipeline_currency:funnel_won_deal_value:avg_held{{{P}}}", "{{currency}}")],
        description="won revenue / won deals.",
        decimals=3,
        w=6,
        h=5,
    )
    b.panel(
        "stat",
        "Average deal size ($window)",
        [instant(f"pipeline_currency_window:funnel_won_deal_value:avg_held{{{PW}}}", "{{currency}}")],
        description="Won revenue / won deals, deals won within the window.",
        decimals=3,
        w=6,
        h=5,
    )

    b.row("Targets")
    b.panel(
        "bargauge",
        "Target attainment",
        [
            instant(
                f"pipeline_currency_period:funnel_revenue_target_attainment:ratio_held{{{P}}}",
                "{{period}} ({{currency}})",
            )
        ],
        description="Won revenue in the current calendar period / target.",
        unit="percentunit",
        w=8,
        h=8,
    )
    b.panel(
        "bargauge",
        "Pace against pro-rated target",
        [
            instant(
                f"pipeline_currency_period:funnel_revenue_target_pace:ratio_held{{{P}}}",
                "{{period}} ({{currency}})",
            )
        ],
        description="Won in period / (target × elapsed share of the period); 100% = on track.",
        unit="percentunit",
        w=8,
        h=8,
    )
    b.panel(
        "table",
        "Won revenue, target and forecast",
        [
            instant(f"pipeline_currency_period:funnel_won_revenue_period:sum_held{{{P}}}", fmt="table"),
            instant(f"pipeline_currency_period:funnel_revenue_target:max{{{P}}}", fmt="table"),
            instant(f"pipeline_currency_period:funnel_revenue_target_expected:sum{{{P}}}", fmt="table"),
            instant(f"pipeline_currency_period:funnel_revenue_forecast:sum_held{{{P}}}", fmt="table"),
        ],
        description="Per period: won so far (A), target (B), pro-rated expectation (C), "
        "forecast = won + weighted open value expected to close in the period (D).",
        w=8,
        h=8,
        transformations=[
            {"id": "merge", "options": {}},
            hide_columns("Time", "pipeline"),
        ],
    )
    b.panel(
        "timeseries",
        "Won revenue vs pro-rated target",
        [
            series(f"pipeline_currency_period:funnel_won_revenue_period:sum_held{{{P}}}", "won {{period}}"),
            series(
                f"pipeline_currency_period:funnel_revenue_target_expected:sum{{{P}}}", "expected {{period}}"
            ),
            series(
                f"pipeline_currency_period:funnel_revenue_forecast:sum_held{{{P}}}", "forecast {{period}}"
            ),
        ],
        description="Won revenue in the current period against the pro-rated target.",
        w=24,
        h=8,
    )
    b.panel(
        "bargauge",
        "Forecast by category ($period, $currency)",
        [
            instant(f"{FORECAST}{{{PCP}}}", "{{category}}"),
            instant(f"pipeline_currency_period:funnel_forecast_commit:sum_held{{{PCP}}}", "commit + closed"),
            instant(f"pipeline_currency_period:funnel_forecast_best_case:sum_held{{{PCP}}}",
                    "best case + commit + closed"),
            instant(f"pipeline_currency_period:funnel_revenue_forecast:sum_held{{{PCP}}}", "weighted"),
        ],
        description="Open amounts expected to close in the period per forecast category (the "
        "CRM's, else the stage's); closed adds the period's won revenue. Then the roll-ups sales "
        "teams read and the weighted forecast (won + open value × stage probability).",
        w=24,
        h=8,
    )

    b.row("Deals, reps and customers")
    b.panel(
        "bargauge",
        "Won deal value distribution ($currency)",
        [
            instant(
                "sum by (le) (pipeline_currency_le:funnel_won_deal_value_bucket:sum_held"
                f'{{{P}, currency="$currency"}})',
                "{{le}}",
                fmt="heatmap",
            )
        ],
        description="Number of won deals in the currency per amount bucket (upper bound shown).",
        w=8,
        h=9,
    )
    # Series stay keyed by owner id; `rep` is the configured name (funnel_owner_info) when there
    # is one, else the id: `or on (owner, currency)` adds only the reps the join left out.
    top_reps = f"topk(10, {money('pipeline_owner_currency', 'rep_won_revenue:sum')})"
    leaderboard = (
        f"label_replace({top_reps} * on (owner) group_left (name) owner:funnel_owner_info:max, "
        '"rep", "$1", "name", "(.+)")\n'
        f'or on (owner, currency) label_replace({top_reps}, "rep", "$1", "owner", "(.+)")'
    )
    b.panel(
        "table",
        "Sales leaderboard (top 10 reps)",
        [instant(leaderboard, fmt="table")],
        description="Reps by won revenue (owner at close); the rep's name from the funnel config "
        "`owners`, else the owner id.",
        w=8,
        h=9,
        transformations=[
            hide_columns("Time", "__name__", "pipeline", "owner", "name"),
            {"id": "sortBy", "options": {"fields": {}, "sort": [{"field": "Value", "desc": True}]}},
        ],
    )
    b.panel(
        "bargauge",
        "Customer lifetime value distribution ($currency)",
        [
            instant(
                "sum by (le) (pipeline_currency_le:funnel_customer_lifetime_value_bucket:sum_held"
                f'{{{P}, currency="$currency"}})',
                "{{le}}",
                fmt="heatmap",
            )
        ],
        description="Number of customers per lifetime-value bucket, lifetime value in the currency.",
        w=8,
        h=9,
    )
    b.panel(
        "stat",
        "Customers",
        [instant(f"pipeline:funnel_customers:sum_held{{{P}}}", "customers")],
        description="Accounts with at least one won deal.",
        w=12,
        h=5,
    )
    b.panel(
        "stat",
        "Customer lifetime value (average)",
        [instant(f"pipeline_currency:funnel_customer_lifetime_value:avg_held{{{P}}}", "{{currency}}")],
        description="Won revenue per customer.",
        decimals=2,
        w=12,
        h=5,
    )
    b.panel(
        "table",
        "Leaderboard by team",
        [instant(f"sort_desc({money('pipeline_team_currency', 'team_won_revenue:sum')})",
                 fmt="table")],
        description="Won revenue per team: the reps' won revenue (owner at close) summed under "
        "the team the funnel config `owners` gives them; reps without one are in team `none`.",
        w=24,
        h=8,
        transformations=[
            hide_columns("Time", "__name__", "pipeline"),
            {"id": "sortBy", "options": {"fields": {}, "sort": [{"field": "Value", "desc": True}]}},
        ],
    )
    quota_panels(b)
    return b


def quota_panels(b: Board) -> None:
    """Quotas (funnel config `quotas`, per fiscal period, in the quota currency): attainment and
    pace per rep and per team, and what the reporting currency could not convert."""
    b.row("Quotas and reporting currency")
    for who, label, level in (("rep", "owner", "pipeline_owner_currency_period"),
                              ("team", "team", "pipeline_team_currency_period")):
        quota = f"{level}:funnel_{who}_quota:max{{{P}}}"
        b.panel(
            "table",
            f"{who.capitalize()} quota attainment",
            [
                instant(f"{level}:funnel_{who}_quota_attainment:ratio_held{{{P}}}", fmt="table"),
                instant(f"{level}:funnel_{who}_quota_pace:ratio_held{{{P}}}", fmt="table"),
                instant(f"{level}:funnel_quota_won_revenue_period:sum_held{{{P}}}\n"
                        f"and on (pipeline, {label}, currency, period) {quota}", fmt="table"),
                instant(quota, fmt="table"),
            ],
            description=f"Per {label} and (fiscal) period: attainment = won in the period / quota "
            "(A), pace = attainment / elapsed share of the period, 1 = on track (B), won in the "
            f"period (C) and quota (D), in the quota currency"
            + (" (a team: the sum over its reps)." if who == "team" else "."),
            w=12,
            h=9,
            transformations=[{"id": "merge", "options": {}}, hide_columns("Time", "pipeline")],
        )
    b.panel(
        "table",
        "Not converted to the reporting currency",
        [instant(f"pipeline_currency_kind:funnel_reporting_unconverted_value:sum_held{{{P}}}",
                 fmt="table")],
        description="Native amounts (won: by close date; open: at the clock) whose currency has "
        "no exchange rate for the date: left out of every reporting-currency total (alert "
        "FunnelExchangeRateMissing when not 0).",
        w=24,
        h=6,
        transformations=[hide_columns("Time", "__name__", "pipeline")],
    )


def leaks() -> Board:
    b = Board(
        "funnel-leaks",
        "Funnel leaks and data health",
        "Stalled deals and value at risk by stage, conversion against its baseline, firing "
        "alerts, event rates by source and outcome, dead-letter queue, lag and worker status.",
    )
    freshness(b)
    b.row("Leaks")
    ordered_stage_panel(
        b,
        "Stalled deals by stage",
        f"pipeline_stage:funnel_deals_stalled:sum_held{{{P}}}",
        description="Open deals in the stage for longer than its stall_after.",
        w=8,
        h=8,
    )
    ordered_stage_panel(
        b,
        "Value at risk by stage",
        f"pipeline_stage_currency:funnel_stalled_value:sum_held{{{P}}}",
        name=STAGE_CURRENCY,
        description="Amounts of the stalled deals, per currency (never added across currencies).",
        w=8,
        h=8,
    )
    ordered_stage_panel(
        b,
        "Stalled share of open deals",
        f"pipeline_stage:funnel_deals_stalled_per_open:ratio_held{{{P}}}",
        description="Stalled / open per stage (FunnelStalledDealsHigh fires above 25% with "
        "at least 10 stalled deals).",
        unit="percentunit",
        w=8,
        h=8,
    )
    b.panel(
        "timeseries",
        "Stage conversion vs trailing baseline",
        [
            series(
                f'pipeline_stage_window:funnel_stage_conversion:ratio_held{{{P}, window="7d"}}',
                "7d {{stage}} → {{next_stage}}",
            ),
            series(
                f"pipeline_stage:funnel_stage_conversion_baseline:ratio_held{{{P}}}",
                "baseline {{stage}} → {{next_stage}}",
            ),
        ],
        description="7-day conversion against the 83 days before it "
        "(FunnelStageConversionDrop: more than 30% below).",
        unit="percentunit",
        w=12,
        h=8,
    )
    b.panel(
        "timeseries",
        "Win rate vs trailing baseline",
        [
            series(f"pipeline_window:funnel_win_rate:ratio_held{{{PW}}}", "$window"),
            series(f"pipeline:funnel_win_rate_baseline:ratio_held{{{P}}}", "baseline"),
        ],
        description="Windowed win rate against the 83 days before the last 7 "
        "(FunnelWinRateDrop compares the 7d window).",
        unit="percentunit",
        w=12,
        h=8,
    )
    b.panel(
        "table",
        "Stall thresholds",
        [instant(f"pipeline_stage:funnel_stall_after_seconds:max{{{P}}}", fmt="table")],
        description="stall_after per open stage (funnel config).",
        unit="s",
        w=8,
        h=8,
        transformations=[hide_columns("Time", "pipeline")],
    )
    b.panel(
        "table",
        "Funnel alerts (pending and firing)",
        [instant('ALERTS{alertname=~"Funnel.+"}', fmt="table")],
        description="Prometheus alerts of this service; see docs/runbooks/<alertname>.md.",
        w=16,
        h=8,
        transformations=[hide_columns("Time", "__name__", "Value")],
    )

    b.row("Data health")
    b.panel(
        "timeseries",
        "Events by source and outcome",
        [
            series(
                "sum by (source, outcome) (rate(funnel_events_total[$__rate_interval]))",
                "{{source}} {{outcome}}",
            )
        ],
        description="CRM events per second (accepted, duplicate, stale, ignored, rejected).",
        unit="reqps",
        w=12,
        h=8,
    )
    b.panel(
        "timeseries",
        "Rejected events by reason",
        [series("sum by (reason) (rate(funnel_events_rejected_total[$__rate_interval]))", "{{reason}}")],
        description="Events sent to crm.events.dlq per second, by reason.",
        unit="reqps",
        w=12,
        h=8,
    )
    b.panel(
        "stat",
        "Dead-letter messages (time range)",
        [instant("sum(increase(funnel_dlq_messages_total[$__range]))", "DLQ")],
        description="Messages written to crm.events.dlq in the selected time range.",
        w=6,
        h=6,
    )
    b.panel(
        "timeseries",
        "Dead-letter rate",
        [series("sum(rate(funnel_dlq_messages_total[$__rate_interval]))", "DLQ")],
        description="Messages per second to crm.events.dlq.",
        unit="reqps",
        w=6,
        h=6,
    )
    b.panel(
        "timeseries",
        "Event lag by source",
        [
            series(
                "histogram_quantile(0.5, sum by (source, le) "
                "(rate(funnel_event_lag_seconds_bucket[$__rate_interval])))",
                "p50 {{source}}",
            ),
            series(
                "histogram_quantile(0.95, sum by (source, le) "
                "(rate(funnel_event_lag_seconds_bucket[$__rate_interval])))",
                "p95 {{source}}",
            ),
        ],
        description="Processing time − occurred_at (replays are years late by design).",
        unit="s",
        w=12,
        h=6,
    )
    b.panel(
        "timeseries",
        "Consumer lag by topic",
        [series("sum by (topic) (funnel_consumer_lag_messages)", "{{topic}}")],
        description="Messages not yet consumed, summed over partitions.",
        w=12,
        h=7,
    )
    b.panel(
        "timeseries",
        "Sink errors",
        [series("sum by (sink) (rate(funnel_sink_errors_total[$__rate_interval]))", "{{sink}}")],
        description="Failed writes per second per sink (Redis, topics).",
        unit="reqps",
        w=12,
        h=7,
    )
    b.panel(
        "stat",
        "Workers up",
        [instant('sum(up{job="funnel-kpi"})', "up")],
        description="Scrape targets of job funnel-kpi that answer.",
        w=4,
        h=6,
    )
    b.panel(
        "stat",
        "Workers ready",
        [instant('sum(funnel_worker_ready{job="funnel-kpi"})', "ready")],
        description="Workers that finished table recovery.",
        w=4,
        h=6,
    )
    b.panel(
        "stat",
        "Broker silent for",
        [instant('max(funnel_broker_ack_age_seconds{job="funnel-kpi"})', "seconds")],
        description="Longest time any worker has gone without an answer from Kafka (a write "
        "acknowledged or the tick probe answered). Under the tick interval (10 s) when healthy; "
        "FunnelBrokerUnreachable fires above 60 s.",
        unit="s",
        w=4,
        h=6,
    )
    b.panel(
        "table",
        "Worker status",
        [
            instant('up{job="funnel-kpi"}', fmt="table"),
            instant('funnel_build_info{job="funnel-kpi"}', fmt="table"),
        ],
        description="Per worker: scrape status (A) and build version (B).",
        w=12,
        h=6,
        transformations=[{"id": "merge", "options": {}}, hide_columns("Time", "__name__")],
    )
    return b


def matrix(column: str, row: str = "value") -> list[dict]:
    """Table rows in stage order (idx), then one row per ``row`` and one column per ``column``:
    the columns appear in stage order because the rows were sorted by idx first."""
    return [
        *ORDERED["transformations"],
        {"id": "groupingToMatrix",
         "options": {"columnField": column, "rowField": row, "valueField": "Value", "emptyValue": "null"}},
    ]


def dimensions() -> Board:
    b = Board(
        "funnel-dimensions",
        "Funnel by dimension",
        "The KPIs of one dimension (funnel config `dimensions`: a deal property such as lead "
        "source, region or sector) side by side per value: win rate, won revenue, deal size, "
        "sales cycle, open deals and value, stage conversion; and what the cardinality guard did. "
        "The values of a dimension, none and other included, add up to the pipeline's totals.",
    )
    b.variables = dimension_variables()
    cur = 'currency="$currency"'
    freshness(b)
    b.row("Winning by value")
    b.panel(
        "bargauge",
        "Win rate by value",
        [instant(f"sort_desc(pipeline_dimension_value:funnel_dimension_win_rate:ratio_held{{{PDV}}})",
                 "{{value}}")],
        description="won / (won + lost) of the deals with this value, deals currently closed, "
        "all currencies. A value without closed deals has no bar.",
        unit="percentunit",
        decimals=2,
        w=12,
        h=9,
    )
    b.panel(
        "bargauge",
        "Won and lost deals by value",
        [instant(f"pipeline_dimension_value_outcome:funnel_dimension_deals_closed:sum_held{{{PDV}}}",
                 "{{value}} {{outcome}}")],
        description="Deals currently won and lost per value (the win rate's counts).",
        w=12,
        h=9,
    )
    b.panel(
        "bargauge",
        "Won revenue by value ($currency)",
        [instant(f"sort_desc(pipeline_dimension_value_currency:funnel_dimension_won_revenue:sum_held"
                 f"{{{PDV}, {cur}}})", "{{value}}")],
        description="Amounts of the won deals with this value, in the selected currency.",
        w=8,
        h=9,
    )
    b.panel(
        "bargauge",
        "Average deal size by value ($currency)",
        [instant(f"sort_desc(pipeline_dimension_value_currency:funnel_dimension_won_deal_value:avg_held"
                 f"{{{PDV}, {cur}}})", "{{value}}")],
        description="Won revenue / won deals of the value, both in the selected currency.",
        decimals=3,
        w=8,
        h=9,
    )
    b.panel(
        "bargauge",
        "Average sales cycle by value (won)",
        [instant("sort(pipeline_dimension_value_outcome:funnel_dimension_time_to_close_seconds:avg_held"
                 f'{{{PDV}, outcome="won"}})', "{{value}}")],
        description="Mean time from first stage entry to close of the won deals with this value.",
        unit="s",
        w=8,
        h=9,
    )

    b.row("Open pipeline and conversion by value")
    b.panel(
        "table",
        "Deals open per stage by value",
        [instant(by_stage_order(f"pipeline_dimension_value_stage:funnel_dimension_deals_open:sum_held{{{PDV}}}"),
                 fmt="table")],
        description="Open deals per value (rows) and open stage (columns, in stage order).",
        w=12,
        h=9,
        transformations=matrix("stage"),
    )
    b.panel(
        "bargauge",
        "Open value by value ($currency)",
        [instant("sort_desc(sum by (pipeline, dimension, value) "
                 "(pipeline_dimension_value_stage_currency:funnel_dimension_open_value:sum_held"
                 f"{{{PDV}, {cur}}}))", "{{value}}")],
        description="Amounts of the open deals with this value (all open stages), in the selected "
        "currency.",
        w=12,
        h=9,
    )
    conversion = (
        'label_join(pipeline_dimension_value_stage:funnel_dimension_stage_conversion:ratio_held'
        f'{{{PDV}}}, "step", " → ", "stage", "next_stage")'
    )
    b.panel(
        "table",
        "Stage conversion by value",
        [instant(by_stage_order(conversion), fmt="table")],
        description="reached(k+1) / reached(k) per value (rows) and pair of consecutive open "
        "stages (columns, in stage order). Empty where no deal of the value reached stage k.",
        unit="percentunit",
        decimals=1,
        w=24,
        h=9,
        transformations=matrix("step"),
    )

    b.row("Guard")
    b.panel(
        "table",
        "Guard: values, folded and limit",
        [
            instant(f'{DIMENSION_GUARD}{{pipeline="$pipeline"}}', fmt="table"),
            instant('pipeline_dimension:funnel_dimension_values_folded:max{pipeline="$pipeline"}',
                    fmt="table"),
            instant('pipeline_dimension:funnel_dimension_values_limit:min{pipeline="$pipeline"}',
                    fmt="table"),
        ],
        description="Per dimension: distinct values with deals (A), values summed as other (B), "
        "values exported at most besides none and other (C: max_values, or less for the series "
        "budget). Per worker, each counting its own partitions: A and B from the worker with most, "
        "C from the one with least. B > 0: values summed as other; every worker exports the "
        "fleet's kept values (FunnelDimensionValuesFolded).",
        w=16,
        h=7,
        transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {
                "excludeByName": {"Time": True, "pipeline": True},
                "renameByName": {"Value #A": "values", "Value #B": "folded", "Value #C": "limit"}}},
        ],
    )
    b.panel(
        "stat",
        "Guard: dimension series vs budget",
        [
            instant("fleet:funnel_dimension_series:max", "series"),
            instant("fleet:funnel_dimension_series_budget:max", "budget"),
        ],
        description="Series of the funnel_dimension_* KPI gauges on the worker with most (A) "
        "against dimension_series_budget (B, config): the guard keeps A under B by folding values "
        "into other.",
        w=8,
        h=7,
    )
    return b


BOARDS = {
    "funnel-overview": overview,
    "funnel-velocity": velocity,
    "funnel-revenue": revenue,
    "funnel-leaks": leaks,
    "funnel-dimensions": dimensions,
}


def render() -> dict[str, str]:
    """File name -> JSON text of every board."""
    out = {}
    for uid, build in BOARDS.items():
        built = build()
        board = built.to_json(variables() if built.variables is None else built.variables)
        out[f"{uid}.json"] = json.dumps(board, indent=2, ensure_ascii=False) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    rendered = render()
    if args.check:
        stale = [
            n
            for n, text in rendered.items()
            if not (OUT_DIR / n).exists() or (OUT_DIR / n).read_text() != text
        ]
        extra = sorted({p.name for p in OUT_DIR.glob("*.json")} - set(rendered))
        for name in stale:
            print(f"stale: grafana/dashboards/{name} (run python grafana/generate.py)")
        for name in extra:
            print(f"not generated: grafana/dashboards/{name}")
        return 1 if stale or extra else 0
    OUT_DIR.mkdir(exist_ok=True)
    for name, text in rendered.items():
        (OUT_DIR / name).write_text(text)
    print(f"wrote {len(rendered)} boards to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
