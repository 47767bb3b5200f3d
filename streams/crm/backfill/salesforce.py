"""Salesforce: ``Opportunity`` and ``OpportunityHistory`` by SOQL ``queryAll`` → CDC events.

Each ``OpportunityHistory`` row (one per change of StageName, Amount, CloseDate, at its
``CreatedDate``) becomes the change event CDC would have sent, carrying the fields that changed
since the previous row; owner, account and currency (not in the history) come from the
opportunity as of its ``SystemModstamp``. They go through the live adapter
(:mod:`streams.crm.sources.salesforce`). Event ids: ``salesforce:history-<row Id>:0:<opportunity>``
and ``salesforce:current-<modstamp ms>:0:<opportunity>``. ``queryAll`` includes deleted rows, so
a deal deleted mid-run is read as deleted, never lost. The fields the funnel config names as
dimensions, and ``ForecastCategoryName``, are selected too and come on the ``current`` event;
where the org tracks their history, each ``OpportunityFieldHistory`` row of a dimension is a
change too (``salesforce:fieldhistory-<row Id>:0:<opportunity>``; a null ``NewValue`` clears the
value). An org without multiple currencies has no ``CurrencyIsoCode``: its deals carry no
currency, as its CDC events, and count in the config's ``default_currency``.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator
from functools import partial
from typing import Any

from simple_salesforce import Salesforce

from streams.crm.backfill.common import CrmStage, Page, adapt_all, epoch_ms, owner_names
from streams.crm.backfill.http import Api, ApiError, TimeoutSession
from streams.crm.backfill.settings import BackfillSettings
from streams.crm.sources import salesforce as live
from streams.crm.sources.common import FORECAST_FIELDS, Adapted, Context, Malformed, as_dict

log = logging.getLogger("funnel_kpi")

NAME = "salesforce"
DEFAULT_RATE = "25/1"  # Salesforce limits calls per 24 h (Sforce-Limit-Info), not per second
CHUNK = 200  # opportunities whose history one query reads (keeps the SOQL short)
OPPORTUNITY = ("SELECT Id, StageName, Amount, CurrencyIsoCode, CloseDate, OwnerId, AccountId, IsDeleted, "
               "CreatedDate, SystemModstamp, ForecastCategoryName FROM Opportunity")
SINGLE_CURRENCY = OPPORTUNITY.replace(" CurrencyIsoCode,", "")  # the field exists with multi-currency only
HISTORY = ("SELECT Id, OpportunityId, StageName, Amount, CloseDate, CreatedDate FROM OpportunityHistory "
           "WHERE OpportunityId IN ({ids}) ORDER BY OpportunityId, CreatedDate, Id")
FIELD_HISTORY = ("SELECT Id, OpportunityId, Field, NewValue, CreatedDate FROM OpportunityFieldHistory "
                 "WHERE OpportunityId IN ({ids}) AND Field IN ({fields}) "
                 "ORDER BY OpportunityId, CreatedDate, Id")
STAGES = ("SELECT ApiName, MasterLabel, DefaultProbability, IsClosed, IsWon, SortOrder FROM OpportunityStage "
          "WHERE IsActive = true ORDER BY SortOrder")
USERS = "SELECT Id, Name FROM User"
TRACKED = ("StageName", "Amount", "CloseDate")
_FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,79}")  # an API name (custom ones end in __c)


class BudgetSpent(RuntimeError):
    """The org's daily API calls are used up to the configured share: stop, resume later."""


def dimension_fields(ctx: Context) -> list[str]:
    """The Opportunity fields the funnel config names as dimensions, checked to be API names
    (they go into SOQL)."""
    fields = list(dict.fromkeys(ctx.dimensions(NAME).values()))
    for field in fields:
        if not _FIELD_NAME.fullmatch(field):
            raise ValueError(f"dimensions: {field!r} is not a Salesforce field API name "
                             "(an Opportunity field such as Region__c)")
    return fields


def with_fields(soql: str, fields: list[str]) -> str:
    """``soql`` selecting ``fields`` too (those it does not select yet)."""
    select, _, rest = soql.partition(" FROM ")
    names = select.removeprefix("SELECT ").split(", ")
    return f"SELECT {', '.join(dict.fromkeys([*names, *fields]))} FROM {rest}"


def deal_events(opp: dict[str, Any], history: list[dict[str, Any]], ctx: Context,
                field_history: list[dict[str, Any]] | None = None) -> Adapted:
    """One opportunity, its history rows and its dimension fields' history rows → canonical
    events (pure)."""
    opp_id = opp.get("Id")
    docs = []
    previous: dict[str, Any] = {}
    for ms, row_id, row in _timed(history, "OpportunityHistory"):
        fields = {name: row.get(name) for name in TRACKED if row.get(name) != previous.get(name)}
        previous = row
        if any(value is not None for value in fields.values()):
            docs.append(_doc("UPDATE" if docs else "CREATE", f"history-{row_id}", opp_id, ms, fields))
    current = {name: opp.get(name) for name in ("OwnerId", "AccountId", "CurrencyIsoCode")}
    if not docs:  # no history rows readable: the opportunity as created, now
        current.update({name: opp.get(name) for name in TRACKED})
    dimensions = dimension_fields(ctx)
    # Dimensions as they are now (not every field has a history), but for those whose values the
    # OpportunityHistory rows above carry already.
    now = [field for field in dimensions if not (docs and field in TRACKED)]
    current.update({field: opp[field] for field in now if opp.get(field) is not None})
    cleared = [field for field in now if field in opp and opp[field] is None]
    for ms, row_id, row in _timed(field_history or [], "OpportunityFieldHistory"):
        field = row.get("Field")
        if field in dimensions:
            value = row.get("NewValue")
            docs.append(_doc("UPDATE", f"fieldhistory-{row_id}", opp_id, ms,
                             {field: value}, nulled=() if value is not None else (field,)))
    modstamp = epoch_ms(opp.get("SystemModstamp") or opp.get("CreatedDate"), "Opportunity.SystemModstamp")
    docs.append(_doc("DELETE" if opp.get("IsDeleted") else "UPDATE", f"current-{modstamp}", opp_id,
                     modstamp, current, nulled=cleared))
    return adapt_all(live.adapt, docs, ctx)


def _timed(rows: list[dict[str, Any]], what: str) -> list[tuple[int, str, dict[str, Any]]]:
    """History rows with their time, oldest first (ties by row id)."""
    return sorted(((epoch_ms(r.get("CreatedDate"), f"{what}.CreatedDate"), str(r.get("Id")), r)
                   for r in rows), key=lambda timed: timed[:2])


def _doc(change: str, transaction: str, opp_id: Any, ms: int, fields: dict[str, Any],
         nulled: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    header = {"entityName": "Opportunity", "recordIds": [opp_id], "changeType": change,
              "transactionKey": transaction, "sequenceNumber": 0, "commitTimestamp": ms,
              "nulledFields": list(nulled)}
    return {"ChangeEventHeader": header, **fields}


def stages_of(records: list[dict[str, Any]]) -> list[CrmStage]:
    """``OpportunityStage`` rows → stages (StageName holds the label; probability in percent)."""
    return [CrmStage("default", "Opportunity", str(r["MasterLabel"]), str(r["MasterLabel"]),
                     None if r.get("DefaultProbability") is None else float(r["DefaultProbability"]) / 100,
                     bool(r.get("IsClosed")), bool(r.get("IsWon")))
            for r in records]


def owners_of(records: list[dict[str, Any]]) -> dict[str, str]:
    """``User`` rows → owner id as CDC carries it (``salesforce:<OwnerId>``) → ``Name``."""
    return owner_names(records, "salesforce:", "Id", "User.Id", lambda record: str(record.get("Name") or ""))


class Reader:
    """Salesforce's REST API through simple-salesforce (an OAuth access token, no login)."""

    name = NAME

    def __init__(self, settings: BackfillSettings, ctx: Context) -> None:
        if not settings.salesforce_instance_url:
            raise ValueError("set FUNNEL_SALESFORCE_INSTANCE_URL (https://<your domain>.my.salesforce.com)")
        self.ctx = ctx
        self.budget = settings.salesforce_api_budget
        self.dimensions = dimension_fields(ctx)
        self.opportunity = with_fields(OPPORTUNITY, self.dimensions)
        # The forecast category counts only as it is now (open deals'): no history read for it.
        self.tracked = [field for field in self.dimensions if field != FORECAST_FIELDS[NAME]]
        self.field_history = bool(self.tracked)  # until the org refuses the query
        self.api = Api.for_crm(NAME, settings, DEFAULT_RATE)
        session = TimeoutSession(settings.backfill_timeout)
        if settings.salesforce_ca_bundle is not None:
            session.verify = str(settings.salesforce_ca_bundle)
        self.sf = Salesforce(instance_url=settings.salesforce_instance_url,
                             session_id=settings.secret("salesforce_access_token"),
                             version=settings.salesforce_api_version, session=session)

    def _call(self, what: str, request: Any) -> dict[str, Any]:
        doc = self.api.call(what, request)
        usage = self.sf.api_usage.get("api-usage")
        if usage is not None and usage.total and usage.used >= self.budget * usage.total:
            raise BudgetSpent(f"the org has used {usage.used} of its {usage.total} daily API calls "
                              f"(FUNNEL_SALESFORCE_API_BUDGET={self.budget}); run again later to resume")
        return as_dict(doc, f"Salesforce {what} answer")

    def _query(self, what: str, soql: str) -> Iterator[list[dict[str, Any]]]:
        """queryAll (deleted rows included), one batch of records per answer."""
        result = self._call(what, lambda: self.sf.query(soql, include_deleted=True))
        while True:
            yield result.get("records") or []
            if result.get("done", True):
                return
            locator = str(result["nextRecordsUrl"]).rsplit("/", 1)[-1]
            result = self._call(what, partial(self.sf.query_more, locator, include_deleted=True))

    def count(self) -> int | None:
        return self._call("deal count", lambda: self.sf.query(
            "SELECT COUNT() FROM Opportunity", include_deleted=True)).get("totalSize")

    def pages(self, cursor: str | None) -> Iterator[Page]:
        where = "" if cursor is None else f" WHERE Id > '{_soql_id(cursor)}'"
        pending: list[dict[str, Any]] = []
        for batch in self._opportunities(where):
            pending += batch
            while len(pending) >= CHUNK:
                yield self._page(pending[:CHUNK], more=True)
                del pending[:CHUNK]
        yield self._page(pending, more=False)

    def _opportunities(self, where: str) -> Iterator[list[dict[str, Any]]]:
        """Opportunity batches; the query drops ``CurrencyIsoCode`` once the org refuses it."""
        batches = self._query("opportunities", f"{self.opportunity}{where} ORDER BY Id")
        try:
            first = next(batches)
        except ApiError as exc:
            single = self.opportunity.replace(" CurrencyIsoCode,", "")
            if self.opportunity == single or not _no_currency_field(exc):
                raise
            log.info("salesforce: the org has one currency (no Opportunity.CurrencyIsoCode); deals "
                     "count in the config's default_currency")
            self.opportunity = single
            batches = self._query("opportunities", f"{self.opportunity}{where} ORDER BY Id")
            first = next(batches)
        return itertools.chain([first], batches)

    def _page(self, opps: list[dict[str, Any]], more: bool) -> Page:
        page = Page(len(opps), [], str(opps[-1]["Id"]) if opps and more else None)
        if not opps:
            return page
        ids = ",".join(f"'{_soql_id(opp.get('Id'))}'" for opp in opps)
        history: dict[str, list[dict[str, Any]]] = {}
        for batch in self._query("history", HISTORY.format(ids=ids)):
            for row in batch:
                history.setdefault(row.get("OpportunityId"), []).append(row)
        changes = self._field_history(ids)
        for opp in opps:
            try:
                page.add(deal_events(opp, history.get(opp.get("Id"), []), self.ctx,
                                     changes.get(opp.get("Id"))))
            except Malformed as exc:
                page.rejects.append(exc)
        return page

    def _field_history(self, ids: str) -> dict[str, list[dict[str, Any]]]:
        """The dimension fields' OpportunityFieldHistory rows by opportunity; none once the org
        refuses the query (no field history tracking, or no access to it): the dimensions are
        then read as they are now."""
        rows: dict[str, list[dict[str, Any]]] = {}
        if not self.field_history:
            return rows
        fields = ",".join(f"'{field}'" for field in self.tracked)
        try:
            for batch in self._query("field history", FIELD_HISTORY.format(ids=ids, fields=fields)):
                for row in batch:
                    rows.setdefault(row.get("OpportunityId"), []).append(row)
        except ApiError as exc:
            if exc.status != 400:
                raise
            log.info("salesforce: OpportunityFieldHistory refused (%s); dimensions are read as they "
                     "are now", str(exc.__cause__ or exc)[:200])
            self.field_history = False
            rows.clear()
        return rows

    def stages(self) -> list[CrmStage]:
        records = [r for batch in self._query("stages", STAGES) for r in batch]
        return stages_of(records)

    def owners(self) -> dict[str, str]:
        """Every user, inactive ones too (they still own won opportunities); needs read on User."""
        return owners_of([r for batch in self._query("users", USERS) for r in batch])


def _no_currency_field(exc: ApiError) -> bool:
    """Salesforce's INVALID_FIELD answer to ``CurrencyIsoCode`` in a single-currency org."""
    return exc.status == 400 and "CurrencyIsoCode" in str(exc.__cause__)


def _soql_id(value: object) -> str:
    """A record id safe inside a SOQL literal (ids are 15/18 alphanumerics)."""
    if not (isinstance(value, str) and value.isalnum() and len(value) in (15, 18)):
        raise Malformed("bad_id", f"not a Salesforce record id: {value!r:.40}")
    return value
