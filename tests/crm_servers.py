"""Local stand-ins for the HubSpot, Pipedrive and Salesforce REST APIs (tests only).

They serve the vendors' documented answer formats from fixture documents, page them, record
when each request arrived, and play scripted faults: ``429`` with ``Retry-After``, ``500``, a
response slower than the client's timeout. The real clients (hubspot-api-client, requests,
simple-salesforce) are pointed at them.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from streams.tools.broker import free_port

TOKEN = "test-token-4711"
SLOW = 2.5  # seconds a "timeout" fault holds the answer (clients are given 1 s)


class CrmServer:
    """Dispatches every request to ``answer``; ``faults[key]`` lists faults for that key's hits."""

    def __init__(self, ssl_context: Any = None) -> None:
        self.server = HTTPServer(host="127.0.0.1", port=free_port(), ssl_context=ssl_context, threaded=True)
        self.server.expect_request(re.compile(".*")).respond_with_handler(self._handle)
        self.arrivals: list[tuple[float, str]] = []
        self.faults: dict[str, list[str]] = {}
        self.played: dict[str, list[str]] = {}  # faults served, per key
        self.lock = threading.Lock()

    def __enter__(self) -> CrmServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.clear()
        self.server.stop()

    @property
    def url(self) -> str:
        scheme = "https" if self.server.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.server.port}"

    def _handle(self, request: Request) -> Response:
        key = self.key(request)
        with self.lock:
            self.arrivals.append((time.monotonic(), key))
            pending = self.faults.get(key) or []
            fault = pending.pop(0) if pending else None
            if fault is not None:
                self.played.setdefault(key, []).append(fault)
        if not self.authorized(request):
            return Response(json.dumps({"message": "unauthorized"}), 401, content_type="application/json")
        if fault == "429":
            return Response(json.dumps({"status": "error", "category": "RATE_LIMITS"}), 429,
                            headers={"Retry-After": "1"}, content_type="application/json")
        if fault == "500":
            return Response(json.dumps({"message": "internal error"}), 500, content_type="application/json")
        if fault == "timeout":
            time.sleep(SLOW)
        status, body, headers = self.answer(request)
        return Response(json.dumps(body), status, headers=headers, content_type="application/json")

    def key(self, request: Request) -> str:
        return request.path

    def authorized(self, request: Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    def answer(self, request: Request) -> tuple[int, Any, dict[str, str]]:
        raise NotImplementedError

    def max_in_window(self, window: float) -> int:
        """The most requests that arrived within any ``window`` seconds."""
        times = sorted(t for t, _ in self.arrivals)
        best, j = 0, 0
        for i, t in enumerate(times):
            while t - times[j] >= window:
                j += 1
            best = max(best, i - j + 1)
        return best

    def gaps_after(self, key: str) -> list[float]:
        """Seconds between consecutive requests for ``key`` (a retry follows its failure)."""
        times = [t for t, k in self.arrivals if k == key]
        return [b - a for a, b in itertools.pairwise(times)]


class HubSpotServer(CrmServer):
    """CRM v3: deals list (``after`` paging, ``archived``), search (total), deal pipelines,
    owners (``after`` paging, ``archived``)."""

    def __init__(self, doc: dict[str, Any], page_size: int = 2, delete_after_first_page: str | None = None):
        super().__init__()
        self.active = list(doc["deals"])
        self.archived = list(doc["archived"])
        self.pipelines = doc["pipelines"]
        self.owners = doc["owners"]
        self.page_size = page_size
        self.delete_after_first_page = delete_after_first_page

    def key(self, request: Request) -> str:
        archived, after = request.args.get("archived", "false").lower(), request.args.get("after", "0")
        return f"{request.method} {request.path} archived={archived} after={after}"

    def answer(self, request: Request) -> tuple[int, Any, dict[str, str]]:
        if request.path == "/crm/v3/objects/deals/search":
            return 200, {"total": len(self.active) + len(self.archived), "results": []}, {}
        if request.path == "/crm/v3/pipelines/deals":
            return 200, self.pipelines, {}
        archived = request.args.get("archived", "").lower() == "true"
        after = int(request.args.get("after", "0"))  # HubSpot's cursor follows the object ids
        if request.path.rstrip("/") == "/crm/v3/owners":
            rest = [o for o in self.owners["archived" if archived else "active"] if int(o["id"]) > after]
            results = rest[:self.page_size]
        elif request.path == "/crm/v3/objects/deals":
            with self.lock:
                deals = sorted(self.archived if archived else self.active, key=lambda d: int(d["id"]))
                rest = [d for d in deals if int(d["id"]) > after]
                results = [self._requested(deal, request)
                           for deal in json.loads(json.dumps(rest[:self.page_size]))]
                if not archived and after == 0 and self.delete_after_first_page:
                    self._archive(self.delete_after_first_page)
        else:
            return 404, {"message": "not found"}, {}
        body: dict[str, Any] = {"results": results}
        if len(rest) > self.page_size:
            last = results[-1]["id"]
            body["paging"] = {"next": {"after": last, "link": f"{self.url}{request.path}?after={last}"}}
        return 200, body, {}

    @staticmethod
    def _requested(deal: dict[str, Any], request: Request) -> dict[str, Any]:
        """The deal with only the properties the request names, as HubSpot answers."""
        for key in ("properties", "propertiesWithHistory"):
            names = {name for value in request.args.getlist(key) for name in value.split(",")}
            if key in deal:
                deal[key] = {name: value for name, value in deal[key].items() if name in names}
        return deal

    def _archive(self, deal_id: str) -> None:
        deal = next(d for d in self.active if d["id"] == deal_id)
        self.active.remove(deal)
        self.archived.append({**deal, "archived": True, "archivedAt": "2025-11-09T10:00:00.000Z"})
        self.delete_after_first_page = None


class PipedriveServer(CrmServer):
    """v2 deals (cursor paging, ``status=deleted``), v1 deal flow (offset paging), summary,
    v2 pipelines and stages, v1 users; authenticated with the ``x-api-token`` header."""

    def __init__(self, doc: dict[str, Any], page_size: int = 2, flow_page: int = 25,
                 delete_at_flow: int | None = None):
        super().__init__()
        self.active = list(doc["deals"])
        self.deleted = list(doc["deleted"])
        self.flows = doc["flows"]
        self.doc = doc
        self.page_size, self.flow_page = page_size, flow_page
        self.delete_at_flow = delete_at_flow
        self.deal_queries: list[dict[str, str]] = []  # the parameters of each deals request

    def authorized(self, request: Request) -> bool:
        return request.headers.get("x-api-token") == TOKEN

    def key(self, request: Request) -> str:
        args = request.args
        return f"{request.path} status={args.get('status', '')} cursor={args.get('cursor', '')}"

    def answer(self, request: Request) -> tuple[int, Any, dict[str, str]]:
        path = request.path
        if path == "/api/v2/deals":
            return 200, self._deals(request), {}
        if match := re.fullmatch(r"/api/v1/deals/(\d+)/flow", path):
            deal_id = int(match[1])
            if deal_id == self.delete_at_flow:  # deleted between the deals page and its flow
                self._delete(deal_id)
            if not any(d["id"] == deal_id for d in self.active):
                return 404, {"success": False, "error": "Deal not found", "errorCode": 404}, {}
            items = self.flows.get(match[1], [])
            start = int(request.args.get("start", "0"))
            more = start + self.flow_page < len(items)
            pagination = {"start": start, "limit": self.flow_page, "more_items_in_collection": more}
            if more:
                pagination["next_start"] = start + self.flow_page
            return 200, {"success": True, "data": items[start:start + self.flow_page],
                         "additional_data": {"pagination": pagination}}, {}
        if path == "/api/v1/users":
            return 200, {"success": True, "data": self.doc["users"]}, {}
        if path == "/api/v1/deals/summary":
            return 200, {"success": True, "data": {"total_count": len(self.active)}}, {}
        if path in ("/api/v2/pipelines", "/api/v2/stages"):
            data = self.doc[path.rsplit("/", 1)[-1]]
            return 200, {"success": True, "data": data, "additional_data": {"next_cursor": None}}, {}
        return 404, {"success": False, "error": "unknown path"}, {}

    def _delete(self, deal_id: int) -> None:
        with self.lock:
            deal = next(d for d in self.active if d["id"] == deal_id)
            self.active.remove(deal)
            self.deleted.append({**deal, "status": "deleted", "is_deleted": True,
                                 "update_time": "2025-11-09T10:00:00Z"})
            self.delete_at_flow = None

    def _deals(self, request: Request) -> dict[str, Any]:
        self.deal_queries.append(dict(request.args))
        deleted = request.args.get("status") == "deleted"
        after = int(request.args.get("cursor", "id0")[2:])  # opaque to clients; keyset here
        with self.lock:
            deals = sorted(self.deleted if deleted else self.active, key=lambda d: d["id"])
            rest = [d for d in deals if d["id"] > after]
            data = json.loads(json.dumps(rest[:self.page_size]))
        if request.args.get("custom_fields"):  # only the custom fields named, as Pipedrive answers
            keys = request.args["custom_fields"].split(",")
            for deal in data:
                custom = deal.get("custom_fields") or {}
                deal["custom_fields"] = {key: value for key, value in custom.items() if key in keys}
        more = len(rest) > self.page_size
        return {"success": True, "data": data,
                "additional_data": {"next_cursor": f"id{data[-1]['id']}" if more else None}}


class SalesforceServer(CrmServer):
    """REST query/queryAll with ``nextRecordsUrl`` paging over Opportunity, OpportunityHistory,
    OpportunityFieldHistory (``field_history=False``: refused, as in an org without access to it),
    OpportunityStage and User (the SOQL the backfill sends is read just enough to filter; ``queries``
    keeps it), over TLS (the
    client only speaks https); every answer carries ``Sforce-Limit-Info``. ``multi_currency=False``
    is an org with one currency: Opportunity has no ``CurrencyIsoCode``, and a query naming it
    gets Salesforce's ``INVALID_FIELD`` answer."""

    VERSION = "59.0"

    def __init__(self, doc: dict[str, Any], tls: Any, page_size: int = 2, history_page: int = 25,
                 daily_limit: int = 15000, delete_after_first_page: str | None = None,
                 multi_currency: bool = True, field_history: bool = True):
        super().__init__(ssl_context=tls)
        self.doc = doc
        self.multi_currency = multi_currency
        self.field_history = field_history  # False: the org does not give OpportunityFieldHistory
        self.queries: list[str] = []
        self.opportunities = [{k: v for k, v in o.items() if multi_currency or k != "CurrencyIsoCode"}
                              for o in doc["opportunities"]]
        self.page_size, self.history_page, self.daily_limit = page_size, history_page, daily_limit
        self.used = 0
        self.cursors: dict[str, list[dict[str, Any]]] = {}
        self.delete_after_first_page = delete_after_first_page

    def key(self, request: Request) -> str:
        q = request.args.get("q", "")
        return f"{request.path} {q[:60]}"

    def answer(self, request: Request) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            self.used += 1
            headers = {"Sforce-Limit-Info": f"api-usage={self.used}/{self.daily_limit}"}
            base = f"/services/data/v{self.VERSION}/queryAll"
            if request.path.rstrip("/") == base:
                soql = parse_qs(request.query_string.decode())["q"][0]
                self.queries.append(soql)
                if not self.field_history and "FROM OpportunityFieldHistory" in soql:
                    return 400, [{"errorCode": "INVALID_TYPE", "message": (
                        "sObject type 'OpportunityFieldHistory' is not supported.")}], headers
                if not self.multi_currency and "CurrencyIsoCode" in soql:
                    column = soql.index("CurrencyIsoCode") + 1
                    return 400, [{"errorCode": "INVALID_FIELD", "message": (
                        f"\n{soql}\n^\nERROR at Row:1:Column:{column}\nNo such column 'CurrencyIsoCode' on "
                        "entity 'Opportunity'. If you are attempting to use a custom field, be sure to "
                        "append the '__c' after the custom field name. Please reference your WSDL or the "
                        "describe call for the appropriate names.")}], headers
                records = self._select(soql)
                if records is None:
                    return 200, {"totalSize": len(self.opportunities), "done": True, "records": []}, headers
                return 200, self._batch(records, 0), headers
            if request.path.startswith(base + "/"):
                locator, _, offset = request.path.rsplit("/", 1)[-1].partition("-")
                return 200, self._batch(self.cursors[locator], int(offset)), headers
        return 404, [{"errorCode": "NOT_FOUND", "message": "unknown resource"}], headers

    def _select(self, soql: str) -> list[dict[str, Any]] | None:
        if soql.startswith("SELECT COUNT()"):
            return None
        if "FROM OpportunityHistory" in soql:
            ids = set(re.findall(r"'(\w+)'", soql))
            return [r for r in self.doc["history"] if r["OpportunityId"] in ids]
        if "FROM OpportunityFieldHistory" in soql:
            names = set(re.findall(r"'(\w+)'", soql))  # the ids and the fields asked for
            return [r for r in self.doc.get("field_history", [])
                    if r["OpportunityId"] in names and r["Field"] in names]
        if "FROM OpportunityStage" in soql:
            return self.doc["stages"]
        if "FROM User" in soql:
            return self.doc["users"]
        after = re.search(r"WHERE Id > '(\w+)'", soql)
        chosen = [o for o in self.opportunities if not after or o["Id"] > after[1]]
        return sorted(chosen, key=lambda o: o["Id"])

    def _batch(self, records: list[dict[str, Any]], offset: int) -> dict[str, Any]:
        opportunities = records and records[0].get("attributes", {}).get("type") == "Opportunity"
        end = offset + (self.page_size if opportunities else self.history_page)
        body: dict[str, Any] = {"totalSize": len(records), "done": end >= len(records),
                                "records": json.loads(json.dumps(records[offset:end]))}
        if end < len(records):
            locator = f"01g{len(self.cursors):015d}"
            self.cursors[locator] = records
            body["nextRecordsUrl"] = f"/services/data/v{self.VERSION}/queryAll/{locator}-{end}"
        if self.delete_after_first_page and opportunities:
            # Deleted while the client reads: later pages (the same record dicts) show it deleted.
            target = next(o for o in self.opportunities if o["Id"] == self.delete_after_first_page)
            target.update(IsDeleted=True, SystemModstamp="2025-11-09T10:00:00.000+0000")
            self.delete_after_first_page = None
        return body


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the CA bundle the client is given) and its key."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key
