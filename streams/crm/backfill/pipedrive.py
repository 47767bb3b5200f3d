"""Pipedrive: deals (API v2, cursor paging) and each deal's flow (v1) → v2 webhook bodies.

The flow lists every field change (``dealChange``: ``field_key``, ``old_value``, ``new_value``,
``log_time``), newest first. Undoing the changes from the deal as it is now gives the deal as
it was after each change and when it was added: exactly the ``data``/``previous`` of the v2
webhooks Pipedrive sends, which then go through the live adapter
(:mod:`streams.crm.sources.pipedrive`). The fields the funnel config names as dimensions are
read the same way: their value now, undone by their flow changes (custom fields by hash key).
Event ids: ``pipedrive:flow:<change id>`` and ``pipedrive:flow:<deal>:add``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from streams.crm.backfill.common import CrmStage, Page, adapt_all, epoch_ms, owner_names, resume
from streams.crm.backfill.http import Api, ApiError, TimeoutSession
from streams.crm.backfill.settings import BackfillSettings
from streams.crm.sources import pipedrive as live
from streams.crm.sources.common import Adapted, Context, Malformed, as_dict, from_epoch, ident

NAME = "pipedrive"
DEFAULT_RATE = "40/2"  # Pipedrive's burst limit is per 2-second window (40 is the lowest plan's)
PAGE_SIZE = 100
MAX_CUSTOM_FIELDS = 15  # custom field keys GET /api/v2/deals takes in ``custom_fields``
_CUSTOM_KEY = re.compile(r"[0-9a-f]{40}")
# Flow field keys (v1 names) → the v2 deal fields the webhook adapter reads.
FIELDS = {"stage_id": "stage_id", "status": "status", "value": "value", "currency": "currency",
          "user_id": "owner_id", "org_id": "org_id", "expected_close_date": "expected_close_date"}


def flow_fields(ctx: Context) -> dict[str, str]:
    """Flow field keys read → deal field keys: :data:`FIELDS` and the configured dimensions'."""
    return {**{key: key for key in ctx.dimensions(NAME).values()}, **FIELDS}


def custom_fields(ctx: Context) -> str | None:
    """The ``custom_fields`` parameter of the deals list: the dimensions' custom field keys (the
    list then carries only those), or None for all of them (more than the API takes, or none)."""
    keys = [key for key in ctx.dimensions(NAME).values() if _CUSTOM_KEY.fullmatch(key)]
    return ",".join(keys) if 0 < len(keys) <= MAX_CUSTOM_FIELDS else None


def deal_events(deal: dict[str, Any], flow: list[dict[str, Any]], ctx: Context) -> Adapted:
    """One v2 deal and its flow items → canonical events (pure)."""
    deal_id = ident(deal.get("id"), "deal.id")
    fields = flow_fields(ctx)
    changes = []
    for i, item in enumerate(flow):
        if not isinstance(item, dict) or item.get("object") != "dealChange":
            continue
        data = as_dict(item.get("data"), f"flow[{i}].data")
        if data.get("field_key") in fields:
            when = epoch_ms(data.get("log_time") or item.get("timestamp"), f"flow[{i}].log_time",
                            naive_utc=True)
            changes.append((when, ident(data.get("id"), f"flow[{i}].data.id"), data))
    changes.sort(key=lambda change: (change[0], int(change[1]) if change[1].isdigit() else 0, change[1]),
                 reverse=True)
    state = {key: deal.get(key) for key in set(FIELDS.values()) | {"id", "is_deleted"}}
    # Dimensions' fields at the top level, as v1 webhooks carry custom fields (the adapter reads both).
    state.update({key: live.field(deal, key) for key in ctx.dimensions(NAME).values()})
    bodies = []
    for when, change_id, data in changes:  # newest first: undo each change
        key = fields[data["field_key"]]
        previous = {key: data.get("old_value")}
        bodies.append(_body("change", deal_id, f"flow:{change_id}", when, dict(state), previous))
        state[key] = data.get("old_value")
    added = epoch_ms(deal.get("add_time"), "deal.add_time", naive_utc=True)
    bodies.append(_body("create", deal_id, f"flow:{deal_id}:add", added, state, None))
    return adapt_all(live.adapt, bodies[::-1], ctx)


def deleted_events(deal: dict[str, Any], ctx: Context) -> Adapted:
    """A deleted deal → the ``delete`` webhook, at its last update (pure)."""
    deal_id = ident(deal.get("id"), "deal.id")
    when = epoch_ms(deal.get("update_time") or deal.get("add_time"), "deal.update_time", naive_utc=True)
    return live.adapt(_body("delete", deal_id, f"flow:{deal_id}:deleted", when, deal, None), ctx)


def _body(action: str, deal_id: str, event_id: str, ms: int, data: dict, previous: dict | None) -> dict:
    return {"meta": {"action": action, "entity": "deal", "entity_id": deal_id, "id": event_id,
                     "timestamp": from_epoch(ms, "timestamp"), "version": "2.0"},
            "data": data, "previous": previous}


def stages_of(pipelines: list[dict[str, Any]], stages: list[dict[str, Any]]) -> list[CrmStage]:
    """``GET /api/v2/pipelines`` and ``/api/v2/stages`` → stages (probability is a percentage)."""
    names = {str(p.get("id")): str(p.get("name", p.get("id"))) for p in pipelines}
    out = []
    for stage in sorted(stages, key=lambda s: (s.get("pipeline_id", 0), s.get("order_nr", 0))):
        pipeline = str(stage.get("pipeline_id"))
        probability = stage.get("deal_probability")
        out.append(CrmStage(pipeline, names.get(pipeline, pipeline), str(stage["id"]),
                            str(stage.get("name", stage["id"])),
                            None if probability is None else float(probability) / 100))
    return out


def owners_of(users: list[Any]) -> dict[str, str]:
    """``GET /v1/users`` → owner id as webhooks carry it → name; deactivated users are kept
    (their won deals stay on the board)."""
    return owner_names(users, "pipedrive:user:", "id", "users.data[].id",
                       lambda user: str(user.get("name") or ""))


class Reader:
    """Pipedrive's REST API with requests (there is no official Python client)."""

    name = NAME

    def __init__(self, settings: BackfillSettings, ctx: Context) -> None:
        self.ctx = ctx
        self.custom_fields = custom_fields(ctx)
        self.base = settings.pipedrive_api_url.rstrip("/")
        self.api = Api.for_crm(NAME, settings, DEFAULT_RATE)
        self.session = TimeoutSession(settings.backfill_timeout)
        self.session.headers["x-api-token"] = settings.secret("pipedrive_api_token")

    def _get(self, what: str, path: str, **params: Any) -> dict[str, Any]:
        def request() -> dict[str, Any]:
            response = self.session.get(f"{self.base}{path}", params=params)
            response.raise_for_status()
            return as_dict(response.json(), f"Pipedrive {what} answer")
        return self.api.call(what, request)

    def count(self) -> int | None:
        summary = self._get("deal count", "/api/v1/deals/summary").get("data") or {}
        return summary.get("total_count")

    def pages(self, cursor: str | None) -> Iterator[Page]:
        """Deals that are not deleted (with their flow), then the deleted ones; the cursor names
        the pass."""
        for kind, after, then in resume(cursor, ("active", "deleted")):
            yield from self._pass(kind == "deleted", after, then)

    def _pass(self, deleted: bool, after: str | None, then: str | None) -> Iterator[Page]:
        kind = "deleted" if deleted else "active"
        while True:
            params: dict[str, Any] = {"limit": PAGE_SIZE, "sort_by": "id", "sort_direction": "asc"}
            if deleted:
                params["status"] = "deleted"
            if self.custom_fields:
                params["custom_fields"] = self.custom_fields
            if after:
                params["cursor"] = after
            doc = self._get(f"{kind} deals page", "/api/v2/deals", **params)
            after = (doc.get("additional_data") or {}).get("next_cursor")
            deals = doc.get("data") or []
            page = Page(len(deals), [], f"{kind}:{after}" if after else then)
            for deal in deals:
                try:
                    deal = as_dict(deal, "data[]")
                    if deleted:
                        page.add(deleted_events(deal, self.ctx))
                        continue
                    flow = self._flow(ident(deal.get("id"), "data[].id"))
                    if flow is None:  # deleted since the page was read: the deleted pass has it
                        page.skipped["deleted_while_reading"] += 1
                        continue
                    page.add(deal_events(deal, flow, self.ctx))
                except Malformed as exc:
                    page.rejects.append(exc)
            yield page
            if not after:
                return

    def _flow(self, deal_id: str) -> list[dict[str, Any]] | None:
        """Every flow item of a deal (offset paging); None when the deal is gone (404/410)."""
        items: list[dict[str, Any]] = []
        start = 0
        while True:
            try:
                doc = self._get("deal flow", f"/api/v1/deals/{deal_id}/flow", start=start, limit=500)
            except ApiError as exc:
                if exc.status in (404, 410):
                    return None
                raise
            items += doc.get("data") or []
            more = ((doc.get("additional_data") or {}).get("pagination") or {})
            if not more.get("more_items_in_collection"):
                return items
            start = more.get("next_start", start + 500)

    def stages(self) -> list[CrmStage]:
        pipelines = self._get("pipelines", "/api/v2/pipelines").get("data") or []
        return stages_of(pipelines, self._get("stages", "/api/v2/stages").get("data") or [])

    def owners(self) -> dict[str, str]:
        """Every user of the company (one answer, no paging), with the API token."""
        return owners_of(self._get("users", "/api/v1/users").get("data") or [])
