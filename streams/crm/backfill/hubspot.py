"""HubSpot: deals with ``propertiesWithHistory`` (CRM v3, ``after`` paging) → webhook events.

Each value in a property's history becomes the ``deal.propertyChange`` webhook event HubSpot
would have sent for it, at the value's ``timestamp``, and goes through the live adapter
(:mod:`streams.crm.sources.hubspot`): values are read by the very code that reads webhooks. The
properties read are the adapter's, ``hs_forecast_category`` and those the funnel config names as
dimensions, so a dimension's values come with their history too (a cleared value is HubSpot's
""). The event id is ``hubspot:history:<deal>-<property>-<timestamp ms>``, the same on every run.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import orjson
from hubspot import HubSpot
from hubspot.crm.deals import PublicObjectSearchRequest

from streams.crm.backfill.common import CrmStage, Page, epoch_ms, owner_names, resume
from streams.crm.backfill.http import Api
from streams.crm.backfill.settings import BackfillSettings
from streams.crm.sources import hubspot as live
from streams.crm.sources.common import Adapted, Context, Malformed, as_dict, from_epoch, gather, ident

NAME = "hubspot"
DEFAULT_RATE = "100/10"  # private apps: 100 requests per 10 seconds (Free/Starter; 190 on Pro)
# Properties the webhook adapter reads; HubSpot reads at most 50 deals a page with history.
HISTORY = ["dealstage", "amount", "deal_currency_code", "hubspot_owner_id", "closedate"]
PAGE_SIZE = 50
OWNERS_PAGE_SIZE = 100  # the owners API's default page (at most 500)


def properties_read(ctx: Context) -> list[str]:
    """The properties whose history is read: the adapter's, the forecast category and the
    configured dimensions'."""
    return list(dict.fromkeys([*HISTORY, *ctx.dimensions(NAME).values()]))


def deal_events(deal: dict[str, Any], ctx: Context) -> Adapted:
    """One deal of the v3 list answer → canonical events (pure)."""
    deal_id = ident(deal.get("id"), "deal.id")
    items: list[dict[str, Any]] = []
    if deal.get("createdAt") is not None:
        items.append(_item(deal_id, "deal.creation", "created", epoch_ms(deal["createdAt"], "createdAt")))
    history = as_dict(deal.get("propertiesWithHistory") or {}, "propertiesWithHistory")
    for name in properties_read(ctx):
        for i, value in enumerate(history.get(name) or []):
            where = f"propertiesWithHistory.{name}[{i}]"
            value = as_dict(value, where)
            ts = epoch_ms(value.get("timestamp"), f"{where}.timestamp")
            item = _item(deal_id, "deal.propertyChange", f"{name}-{ts}", ts)
            item.update(propertyName=name, propertyValue=value.get("value"))
            items.append(item)
    out = live.adapt(items, ctx)
    company = _company(deal)
    if company is not None and deal.get("updatedAt") is not None:
        # Webhooks carry no associations: the company is read as of the deal's last update.
        updated = epoch_ms(deal["updatedAt"], "updatedAt")
        # An event no live payload can express, checked the same way.
        gather(out, lambda: [{"event_id": f"hubspot:history:{deal_id}-company-{company}-{updated}",
                              "occurred_at": from_epoch(updated, "updatedAt"),
                              "deal_id": f"hubspot:deal:{deal_id}",
                              "account": f"hubspot:company:{company}", "source": NAME}])
    return out


def archived_events(deal: dict[str, Any], ctx: Context) -> Adapted:
    """An archived (deleted) deal → its history and the ``deal.deletion`` event at ``archivedAt``
    (pure): a later restore webhook carries no properties, so the values must be known."""
    out = deal_events(deal, ctx)
    deal_id = ident(deal.get("id"), "deal.id")
    ts = epoch_ms(deal.get("archivedAt") or deal.get("updatedAt"), "archivedAt")
    deletion = live.adapt([_item(deal_id, "deal.deletion", f"archived-{ts}", ts)], ctx)
    out.events += deletion.events
    out.rejects += deletion.rejects
    return out


def _item(deal_id: str, kind: str, suffix: str, ts: int) -> dict[str, Any]:
    return {"subscriptionType": kind, "objectId": deal_id, "subscriptionId": "history",
            "eventId": f"{deal_id}-{suffix}", "occurredAt": ts}


def _company(deal: dict[str, Any]) -> str | None:
    results = ((deal.get("associations") or {}).get("companies") or {}).get("results") or []
    primary = [r for r in results if isinstance(r, dict) and r.get("type") == "deal_to_company"]
    for result in primary or results:
        if isinstance(result, dict) and result.get("id") is not None:
            return ident(result["id"], "associations.companies.id")
    return None


def stages_of(doc: dict[str, Any]) -> list[CrmStage]:
    """``GET /crm/v3/pipelines/deals`` → stages (metadata values are strings in HubSpot's API)."""
    stages = []
    for pipeline in doc.get("results") or []:
        for stage in pipeline.get("stages") or []:
            meta = stage.get("metadata") or {}
            probability = meta.get("probability")
            closed = str(meta.get("isClosed", "false")).lower() == "true"
            stages.append(CrmStage(
                str(pipeline["id"]), str(pipeline.get("label", pipeline["id"])), str(stage["id"]),
                str(stage.get("label", stage["id"])),
                None if probability in (None, "") else float(probability),
                closed, closed and probability not in (None, "") and float(probability) >= 1.0,
            ))
    return stages


def owners_of(doc: dict[str, Any]) -> dict[str, str]:
    """A ``GET /crm/v3/owners`` page → owner id as webhooks carry it → name (first and last
    name, else the email); an owner without either is left out (the board shows its id)."""
    def name_of(owner: dict[str, Any]) -> str:
        name = " ".join(str(owner.get(k) or "").strip() for k in ("firstName", "lastName")).strip()
        return name or str(owner.get("email") or "")

    return owner_names(doc.get("results") or [], "hubspot:owner:", "id", "owners.results[].id", name_of)


class Reader:
    """The HubSpot API through the official client, pointed at ``FUNNEL_HUBSPOT_API_URL``."""

    name = NAME

    def __init__(self, settings: BackfillSettings, ctx: Context) -> None:
        self.ctx = ctx
        self.properties = properties_read(ctx)
        self.timeout = settings.backfill_timeout
        self.api = Api.for_crm(NAME, settings, DEFAULT_RATE)
        # retry=False: every retry goes through Api.call (rate limit, Retry-After, backoff).
        self.client = HubSpot(access_token=settings.secret("hubspot_access_token"),
                              host=settings.hubspot_api_url.rstrip("/"), retry=False)

    def _json(self, what: str, request: Any) -> dict[str, Any]:
        response = self.api.call(what, request)
        return as_dict(orjson.loads(response.data), f"HubSpot {what} answer")

    def count(self) -> int | None:
        search = self.client.crm.deals.search_api
        doc = self._json("deal count", lambda: search.do_search(
            PublicObjectSearchRequest(limit=1), _preload_content=False, _request_timeout=self.timeout))
        return doc.get("total")

    def pages(self, cursor: str | None) -> Iterator[Page]:
        """Deals in CRM order, then the archived (deleted) ones; the cursor names the pass."""
        for kind, after, then in resume(cursor, ("active", "archived")):
            yield from self._pass(kind == "archived", after, then)

    def _pass(self, archived: bool, after: str | None, then: str | None) -> Iterator[Page]:
        basic = self.client.crm.deals.basic_api
        kind = "archived" if archived else "active"
        while True:
            doc = self._json(f"{kind} deals page", partial(
                basic.get_page, limit=PAGE_SIZE, after=after, properties=self.properties,
                properties_with_history=self.properties, associations=["companies"], archived=archived,
                _preload_content=False, _request_timeout=self.timeout))
            after = ((doc.get("paging") or {}).get("next") or {}).get("after")
            results = doc.get("results") or []
            cursor = f"{kind}:{after}" if after else then
            page = Page(len(results), [], cursor)
            for deal in results:
                try:
                    deal = as_dict(deal, "results[]")
                    page.add(archived_events(deal, self.ctx) if archived else deal_events(deal, self.ctx))
                except Malformed as exc:
                    page.rejects.append(exc)
            yield page
            if after is None:
                return

    def stages(self) -> list[CrmStage]:
        pipelines = self.client.crm.pipelines.pipelines_api
        return stages_of(self._json("pipelines", lambda: pipelines.get_all(
            object_type="deals", _preload_content=False, _request_timeout=self.timeout)))

    def owners(self) -> dict[str, str]:
        """Active owners, then archived ones (reps who left still own won deals); needs the
        ``crm.objects.owners.read`` scope."""
        api = self.client.crm.owners.owners_api
        owners: dict[str, str] = {}
        for archived in (False, True):
            after = None
            while True:
                doc = self._json(f"{'archived ' if archived else ''}owners page", partial(
                    api.get_page, limit=OWNERS_PAGE_SIZE, after=after, archived=archived,
                    _preload_content=False, _request_timeout=self.timeout))
                for owner, name in owners_of(doc).items():
                    owners.setdefault(owner, name)  # an active owner's name wins
                after = ((doc.get("paging") or {}).get("next") or {}).get("after")
                if after is None:
                    break
        return owners
