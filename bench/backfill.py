"""Backfill speed against local CRM APIs: deals/s, events/s, API calls per 1,000 deals.

``python -m bench.backfill [--deals 1000]`` serves synthetic deals (5 stage changes, an amount
and an owner each) from the test servers in the vendors' formats at their real page sizes, runs
``streams.crm.backfill.runner.backfill`` into an embedded broker with the rate limit lifted, and
prints one line per CRM. With the default rate limits the API calls, not the backfill, set the
pace: seconds per 1,000 deals = calls per 1,000 deals / requests per second.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import tempfile
from pathlib import Path

from streams.crm.backfill import hubspot, pipedrive, salesforce
from streams.crm.backfill.runner import backfill
from streams.crm.backfill.settings import BackfillSettings
from streams.kafka.settings import Settings
from streams.tools.broker import EmbeddedBroker
from tests.crm_servers import TOKEN, HubSpotServer, PipedriveServer, SalesforceServer, tls_files
from tests.test_sources_common import CTX

HS = ["appointmentscheduled", "qualifiedtobuy", "presentationscheduled", "decisionmakerboughtin", "closedwon"]
SF = ["Prospecting", "Qualification", "Needs Analysis", "Negotiation/Review", "Closed Won"]


def at(n: int, i: int, sep: str = "T") -> str:
    return f"2025-{1 + n % 12:02d}-{1 + n % 28:02d}{sep}{8 + i:02d}:00:00"


def hubspot_doc(deals: int) -> dict:
    def history(values):
        return [{"value": v, "timestamp": at(n, i) + ".000Z", "sourceType": "CRM_UI"} for i, v in values][
            ::-1
        ]

    out = []
    for n in range(deals):
        out.append(
            {
                "id": str(1000 + n),
                "createdAt": at(n, 0) + ".000Z",
                "updatedAt": at(n, 4) + ".000Z",
                "archived": False,
                "properties": {},
                "propertiesWithHistory": {
                    "dealstage": history(enumerate(HS)),
                    "amount": history([(0, str(100 + n))]),
                    "hubspot_owner_id": history([(0, str(n % 7))]),
                },
            }
        )
    return {"deals": out, "archived": [], "pipelines": {"results": []}}


def pipedrive_doc(deals: int) -> dict:
    out, flows = [], {}
    for n in range(deals):
        deal_id = 1000 + n
        out.append(
            {
                "id": deal_id,
                "owner_id": n % 7,
                "value": 100 + n,
                "currency": "USD",
                "org_id": n % 50,
                "stage_id": 5,
                "pipeline_id": 1,
                "status": "open",
                "add_time": at(n, 0) + "Z",
                "update_time": at(n, 4) + "Z",
                "is_deleted": False,
            }
        )
        flows[str(deal_id)] = [
            {
                "object": "dealChange",
                "timestamp": at(n, i, " "),
                "data": {
                    "id": deal_id * 10 + i,
                    "item_id": deal_id,
                    "field_key": "stage_id",
                    "old_value": str(i),
                    "new_value": str(i + 1),
                    "log_time": at(n, i, " "),
                },
            }
            for i in range(4, 0, -1)
        ]
    return {"deals": out, "deleted": [], "flows": flows, "pipelines": [], "stages": []}


def salesforce_doc(deals: int) -> dict:
    opps, history = [], []
    for n in range(deals):
        opp_id = f"006SM{n:013d}"
        opps.append(
            {
                "attributes": {"type": "Opportunity"},
                "Id": opp_id,
                "StageName": SF[-1],
                "Amount": 100 + n,
                "CurrencyIsoCode": "USD",
                "CloseDate": "2025-12-15",
                "OwnerId": f"005SM{n % 7:013d}",
                "AccountId": f"001SM{n % 50:013d}",
                "IsDeleted": False,
                "CreatedDate": at(n, 0) + ".000+0000",
                "SystemModstamp": at(n, 4) + ".000+0000",
            }
        )
        history += [
            {
                "attributes": {"type": "OpportunityHistory"},
                "Id": f"008SM{n:011d}{i:02d}",
                "OpportunityId": opp_id,
                "StageName": stage,
                "Amount": 100 + n,
                "CloseDate": "2025-12-15",
                "CreatedDate": at(n, i) + ".000+0000",
            }
            for i, stage in enumerate(SF)
        ]
    return {"opportunities": opps, "history": history, "stages": []}


async def measure(deals: int, workdir: Path) -> None:
    cert, key = tls_files(workdir)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    runs = {
        "hubspot": (
            lambda: HubSpotServer(hubspot_doc(deals), page_size=hubspot.PAGE_SIZE),
            hubspot.Reader,
            lambda url: {"hubspot_api_url": url, "hubspot_access_token": TOKEN},
        ),
        "pipedrive": (
            lambda: PipedriveServer(pipedrive_doc(deals), page_size=pipedrive.PAGE_SIZE, flow_page=500),
            pipedrive.Reader,
            lambda url: {"pipedrive_api_url": url, "pipedrive_api_token": TOKEN},
        ),
        "salesforce": (
            lambda: SalesforceServer(salesforce_doc(deals), tls, page_size=2000, history_page=2000),
            salesforce.Reader,
            lambda url: {
                "salesforce_instance_url": url,
                "salesforce_access_token": TOKEN,
                "salesforce_ca_bundle": cert,
            },
        ),
    }
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        settings = Settings(broker=broker.url, partitions=4)
        for crm, (server_of, reader_of, options) in runs.items():
            with server_of() as server:
                reader = reader_of(
                    BackfillSettings(
                        backfill_rate="1000000/1", backfill_state_dir=workdir, **options(server.url)
                    ),
                    CTX,
                )
                totals = await backfill(reader, settings, workdir, progress=False)
            print(
                f"{crm:10s} {totals.deals} deals, {totals.events} events in {totals.seconds:.2f}s: "
                f"{totals.deals / totals.seconds:,.0f} deals/s, "
                f"{totals.events / totals.seconds:,.0f} events/s; "
                f"{1000 * totals.calls / totals.deals:,.1f} API calls per 1,000 deals"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deals", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        asyncio.run(measure(args.deals, Path(workdir)))


if __name__ == "__main__":
    main()
