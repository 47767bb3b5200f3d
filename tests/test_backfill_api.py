"""The backfill readers with the real clients against local servers speaking the vendors'
documented formats: paging, 429 + Retry-After, 500, a timeout, a deal deleted mid-run, owners
and companies missing, 60 stage changes, the rate limit measured at the server."""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import ssl
from pathlib import Path

import pytest
import yaml

import models
from models.config import load_config
from streams.crm.backfill import hubspot, pipedrive, runner, salesforce
from streams.crm.backfill.common import CrmStage, Page
from streams.crm.backfill.settings import SECRETS, BackfillSettings
from streams.crm.backfill.stage_map import render, render_owners
from streams.kafka.settings import Settings

from .conftest import cli
from .crm_servers import TOKEN, HubSpotServer, PipedriveServer, SalesforceServer, tls_files
from .test_backfill_convergence import kpi_state, live_events
from .test_sources_common import CTX, apply, fixture
from .test_sources_properties import DIMS_CTX, PIPEDRIVE_REGION, latest_properties

SHIPPED = Path(models.__file__).parent / "funnel.yaml"
RATE = (4, 1.0)  # requests per second the tests allow: low, so the limit is what paces the runs
SIXTY = ["appointmentscheduled", "qualifiedtobuy", "presentationscheduled", "decisionmakerboughtin"]


def settings(**extra) -> BackfillSettings:
    return BackfillSettings(backfill_timeout=1.0, backfill_retries=4, backfill_rate=f"{RATE[0]}/{RATE[1]:g}",
                            **extra)


def read_all(reader) -> Page:
    total = Page(0, [], None)
    for page in reader.pages(None):
        total.deals += page.deals
        total.events += page.events
        total.skipped.update(page.skipped)
        total.rejects += page.rejects
    return total


def assert_session_deals_match(events: list[dict], crm: str, deleted: set[str]) -> dict:
    deals, _ = apply(events)
    live, _ = apply(live_events(crm))
    for deal_id, deal in live.items():
        if deal_id in deleted:
            assert deals[deal_id].is_deleted, deal_id
        else:
            assert kpi_state(deals[deal_id]) == kpi_state(deal), deal_id
    return deals


# Least seconds between a failed request and its retry: Retry-After: 1; the first backoff
# (0.5 s); the client's 1 s timeout plus that backoff.
WAIT = {"429": 1.0, "500": 0.5, "timeout": 1.5}


def assert_good_citizen(server, reader) -> None:
    """The rate limit held at the server, and every fault was retried only after its wait."""
    assert server.max_in_window(RATE[1]) <= RATE[0]
    assert reader.api.calls == len(server.arrivals)
    for key, faults in server.played.items():
        gaps = server.gaps_after(key)
        assert len(gaps) >= len(faults), f"{key} was not retried"
        for fault, gap in zip(faults, gaps, strict=False):
            assert gap >= WAIT[fault] - 0.02, (key, fault, gaps)


def hubspot_doc() -> dict:
    doc = copy.deepcopy(fixture("backfill_hubspot.json"))
    sixty = [{"value": SIXTY[i % 4], "timestamp": f"2025-11-{3 + i // 24:02d}T{i % 24:02d}:00:00.000Z",
              "sourceType": "CRM_UI"} for i in range(60)][::-1]
    doc["deals"] += [
        {"id": "201", "properties": {"dealstage": sixty[0]["value"], "hubspot_owner_id": "333"},
         "propertiesWithHistory": {"dealstage": sixty, "hubspot_owner_id": [
             {"value": "333", "timestamp": "2025-11-03T00:00:00.000Z", "sourceType": "CRM_UI"}]},
         "createdAt": "2025-11-03T00:00:00.000Z", "updatedAt": "2025-11-05T11:00:00.000Z", "archived": False,
         "associations": {"companies": {"results": [{"id": "9001", "type": "deal_to_company"},
                                                    {"id": "9001", "type": "deal_to_company_unlabeled"}]}}},
        {"id": "202", "properties": {"dealstage": "qualifiedtobuy"},
         "propertiesWithHistory": {
             "dealstage": [{"value": "qualifiedtobuy", "timestamp": "2025-11-04T00:00:00.000Z",
                            "sourceType": "IMPORT"}],
             "hubspot_owner_id": [], "amount": []},
         "createdAt": "2025-11-04T00:00:00.000Z", "updatedAt": "2025-11-04T00:00:00.000Z", "archived": False},
    ]
    return doc


def test_hubspot_reader_with_the_official_client():
    with HubSpotServer(hubspot_doc(), delete_after_first_page="104") as server:
        page_2 = "GET /crm/v3/objects/deals archived=false after=102"
        page_3 = "GET /crm/v3/objects/deals archived=false after=201"  # 103 and 201: 104 is gone
        archived = "GET /crm/v3/objects/deals archived=true after=0"
        server.faults = {page_2: ["429"], page_3: ["500"], archived: ["timeout"]}
        reader = hubspot.Reader(settings(hubspot_api_url=server.url, hubspot_access_token=TOKEN), CTX)
        read = read_all(reader)
        assert read.rejects == []
        deals = assert_session_deals_match(read.events, "hubspot", {"hubspot:deal:104", "hubspot:deal:105"})
        assert len(deals["hubspot:deal:201"].history) == 60
        assert deals["hubspot:deal:201"].owner == "hubspot:owner:333"
        assert deals["hubspot:deal:201"].value("account") == "hubspot:company:9001"
        assert deals["hubspot:deal:202"].owner is None and deals["hubspot:deal:202"].value("account") is None
        assert read.deals == 7  # 101-103, 201, 202 active; 104 (deleted mid-run) and 105 archived
        assert_good_citizen(server, reader)
        assert len(server.played) == 3
        assert reader.count() == 7


def pipedrive_doc() -> dict:
    doc = copy.deepcopy(fixture("backfill_pipedrive.json"))
    base = doc["deals"][0]
    flow = []
    for i in range(60):  # stage moves 1→2→3→4→1…, an hour apart, newest first in the flow
        old, new = str(i % 4 + 1), str((i + 1) % 4 + 1)
        when = f"2025-11-{3 + i // 24:02d} {i % 24:02d}:30:00"
        flow.append({"object": "dealChange", "timestamp": when, "data": {
            "id": 9000 + i, "item_id": 7, "user_id": 1, "field_key": "stage_id", "old_value": old,
            "new_value": new, "log_time": when, "change_source": "app", "additional_data": []}})
    doc["deals"] += [
        {**base, "id": 7, "stage_id": int(flow[-1]["data"]["new_value"]), "status": "open",
         "add_time": "2025-11-03T00:00:00Z"},
        {**base, "id": 8, "owner_id": None, "org_id": None, "status": "open", "stage_id": 2},
    ]
    doc["flows"]["7"] = flow[::-1]
    return doc


def test_pipedrive_reader_with_requests():
    with PipedriveServer(pipedrive_doc(), delete_at_flow=4) as server:
        page_2 = "/api/v2/deals status= cursor=id2"
        deleted = "/api/v2/deals status=deleted cursor="
        flow_7 = "/api/v1/deals/7/flow status= cursor="
        server.faults = {page_2: ["429"], deleted: ["500"], flow_7: ["timeout"]}
        reader = pipedrive.Reader(settings(pipedrive_api_url=server.url, pipedrive_api_token=TOKEN), CTX)
        read = read_all(reader)
        assert read.rejects == []
        assert read.skipped["deleted_while_reading"] == 1
        deals = assert_session_deals_match(read.events, "pipedrive", {"pipedrive:deal:3", "pipedrive:deal:4"})
        assert len(deals["pipedrive:deal:7"].history) == 61  # added in stage 1, then 60 moves
        assert deals["pipedrive:deal:8"].owner is None and deals["pipedrive:deal:8"].value("account") is None
        assert_good_citizen(server, reader)
        assert len(server.played) == 3


def salesforce_doc() -> dict:
    doc = copy.deepcopy(fixture("backfill_salesforce.json"))
    stages = ["Prospecting", "Qualification", "Needs Analysis", "Negotiation/Review"]
    opp = {**doc["opportunities"][0], "Id": "006SM0000001Tc1YAE", "StageName": stages[59 % 4],
           "AccountId": None, "OwnerId": None, "SystemModstamp": "2025-11-06T00:00:00.000+0000"}
    doc["opportunities"].append(opp)
    doc["history"] += [{"attributes": {"type": "OpportunityHistory"}, "Id": f"008SM0000000B{i:02d}YAE",
                        "OpportunityId": opp["Id"], "StageName": stages[i % 4], "Amount": 1000,
                        "CloseDate": "2025-12-15",
                        "CreatedDate": f"2025-11-{3 + i // 24:02d}T{i % 24:02d}:00:00.000+0000"}
                       for i in range(60)]
    return doc


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    cert, key = tls_files(tmp_path_factory.mktemp("tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


def salesforce_settings(server, cert, **extra) -> BackfillSettings:
    return settings(salesforce_instance_url=server.url, salesforce_access_token=TOKEN,
                    salesforce_ca_bundle=cert, **extra)


def test_salesforce_reader_with_simple_salesforce(tls):
    context, cert = tls
    with SalesforceServer(salesforce_doc(), context, delete_after_first_page="006SM0000001Tb5YAE") as server:
        first = f"/services/data/v59.0/queryAll/ {salesforce.OPPORTUNITY[:60]}"
        more = "/services/data/v59.0/queryAll/01g000000000000000-2 "
        server.faults = {first: ["500"], more: ["timeout"]}
        reader = salesforce.Reader(salesforce_settings(server, cert), CTX)
        read = read_all(reader)
        assert read.rejects == []
        deals = assert_session_deals_match(read.events, "salesforce", {"salesforce:006SM0000001Tb5YAE"})
        assert len(deals["salesforce:006SM0000001Tc1YAE"].history) == 60
        assert deals["salesforce:006SM0000001Tc1YAE"].owner is None
        assert_good_citizen(server, reader)
        assert len(server.played) == 2
        assert reader.count() == 4


def test_salesforce_stops_resumably_when_the_daily_api_budget_is_spent(tls):
    context, cert = tls
    with SalesforceServer(salesforce_doc(), context, daily_limit=10) as server:
        reader = salesforce.Reader(salesforce_settings(server, cert, salesforce_api_budget=0.5), CTX)
        pages = reader.pages(None)
        with pytest.raises(salesforce.BudgetSpent, match="used 5 of its 10 daily API calls"):
            for _ in pages:
                pass
        assert len(server.arrivals) == 5


# The owners each CRM's fixture yields: HubSpot's first + last name, else the email (333), no
# queue without either (444), archived owners too (555, read after the active pages); inactive
# Pipedrive users and Salesforce users too; quotes, colons, # and unicode kept exactly.
OWNERS = {
    "hubspot": {"hubspot:owner:111": "Jane Doe", "hubspot:owner:222": 'José "Pepe" Núñez: EMEA',
                "hubspot:owner:333": "sam@example.com", "hubspot:owner:555": "Ole Ask"},
    "pipedrive": {"pipedrive:user:18487521": "Ravi Patel", "pipedrive:user:18487522": "Chloë O'Brien"},
    "salesforce": {"salesforce:005SM000000146PYAQ": "Ana Lima",
                   "salesforce:005SM000000146QYAQ": "王芳 (Fang) #2",
                   "salesforce:005SM000000146RYAQ": "Automated Process"},
}
# A fault on an owners request: it goes through the same rate limit and retries as the deals.
OWNER_FAULTS = {"hubspot": {"GET /crm/v3/owners/ archived=false after=222": ["429"]},
                "pipedrive": {"/api/v1/users status= cursor=": ["500"]},
                "salesforce": {"/services/data/v59.0/queryAll/ SELECT Id, Name FROM User": ["timeout"]}}


def local_crm(crm: str, tls) -> tuple:
    """(the CRM's local server with its fixture, reader for a started server)."""
    context, cert = tls
    server = {"hubspot": lambda: HubSpotServer(hubspot_doc()),
              "pipedrive": lambda: PipedriveServer(pipedrive_doc()),
              "salesforce": lambda: SalesforceServer(salesforce_doc(), context)}[crm]()

    def reader_of(started):
        options = {"hubspot": {"hubspot_api_url": started.url, "hubspot_access_token": TOKEN},
                   "pipedrive": {"pipedrive_api_url": started.url, "pipedrive_api_token": TOKEN},
                   "salesforce": {"salesforce_instance_url": started.url, "salesforce_access_token": TOKEN,
                                  "salesforce_ca_bundle": cert}}[crm]
        module = {"hubspot": hubspot, "pipedrive": pipedrive, "salesforce": salesforce}[crm]
        return module.Reader(settings(**options), CTX)

    return server, reader_of


@pytest.mark.parametrize("crm", ["hubspot", "pipedrive", "salesforce"])
def test_printed_stage_map_and_owners_load_as_funnel_config(crm, tls, tmp_path):
    server, reader_of = local_crm(crm, tls)
    with server:
        server.faults = copy.deepcopy(OWNER_FAULTS[crm])
        reader = reader_of(server)
        text = render(crm, reader.stages(), reader.owners(), CTX.config)
        assert_good_citizen(server, reader)
        assert server.played == OWNER_FAULTS[crm]
    if crm == "hubspot":  # two pages of active owners (after=222), then the archived ones
        owner_requests = [key for _, key in server.arrivals if "/crm/v3/owners" in key]
        assert owner_requests == ["GET /crm/v3/owners/ archived=false after=0",
                                  "GET /crm/v3/owners/ archived=false after=222",
                                  "GET /crm/v3/owners/ archived=false after=222",  # after its 429
                                  "GET /crm/v3/owners/ archived=true after=0"]
    printed = yaml.safe_load(text)
    assert list(printed) == ["stage_maps", "owners"]
    assert printed["owners"] == OWNERS[crm]
    block = printed["stage_maps"][crm]
    shipped = yaml.safe_load(SHIPPED.read_text())
    shipped["stage_maps"][crm] = {**shipped["stage_maps"].get(crm, {}), **block}
    shipped["owners"] = printed["owners"]
    path = tmp_path / "funnel.yaml"
    path.write_text(yaml.safe_dump(shipped))
    # The printed blocks make a valid funnel config, and its owner ids are those the deals carry.
    assert load_config(path).owners == OWNERS[crm]
    # The CRM's default pipeline prints exactly the shipped map (pasted back, it changes nothing;
    # by nearest probability HubSpot's default stages left lead and mql empty).
    assert block["default"] == yaml.safe_load(SHIPPED.read_text())["stage_maps"][crm]["default"]
    assert "as in the funnel config" in text


def test_stages_the_config_does_not_map_go_by_name_outcome_then_probability():
    stages = [CrmStage("default", "Sales", "appointmentscheduled", "Appointment scheduled", 0.2),
              CrmStage("default", "Sales", "custom1", "Lead", 0.9),
              CrmStage("default", "Sales", "custom2", "Discovery", 0.35),
              CrmStage("default", "Sales", "custom3", "Signed", 1.0, closed=True, won=True)]
    text = render("hubspot", stages, {}, CTX.config)
    assert yaml.safe_load(text)["stage_maps"]["hubspot"]["default"] == {
        "appointmentscheduled": "lead", "custom1": "lead", "custom2": "opportunity", "custom3": "won"}
    why = [line.rsplit(": ", 1)[1] for line in text.splitlines() if "custom" in line or "appoint" in line]
    assert why == ["as in the funnel config", "same name", "nearest probability", "closed won"]


@pytest.mark.parametrize("crm", ["hubspot", "pipedrive", "salesforce"])
def test_owner_names_are_keyed_by_the_ids_the_backfilled_deals_carry(crm, tls):
    """Every owner a backfilled deal of the fixture carries has its name in the owners block."""
    server, reader_of = local_crm(crm, tls)
    with server:
        reader = reader_of(server)
        owners = {event["owner"] for event in read_all(reader).events if event.get("owner")}
        names = reader.owners()
    assert owners and owners <= set(names)


@pytest.mark.parametrize("name", ['Jane "JD" Doe', "O'Neil: EMEA", "#1 rep", "yes", " padded ",
                                  "Zoë 王芳 😀", "tab\tand\nnewline",
                                  "back\\slash", "nel\x85ls\u2028", "{flow}, [x]", "null"])
def test_the_owners_block_reads_back_exactly_whatever_the_name(name):
    printed = yaml.safe_load(render_owners("hubspot", {"hubspot:owner:1": name, "hubspot:owner:2": "Li"}))
    assert printed == {"owners": {"hubspot:owner:1": name, "hubspot:owner:2": "Li"}}


def test_owner_names_from_each_crm_answer():
    assert hubspot.owners_of({"results": [
        {"id": "1", "firstName": " Jane ", "lastName": "Doe", "email": "j@x"},
        {"id": "2", "firstName": "Jane", "lastName": None, "email": "j2@x"},
        {"id": "3", "firstName": None, "lastName": None, "email": "j3@x"},
        {"id": "4", "type": "QUEUE"}, {"id": "bad id", "firstName": "X"}, "junk"]}) == {
        "hubspot:owner:1": "Jane Doe", "hubspot:owner:2": "Jane", "hubspot:owner:3": "j3@x"}
    assert pipedrive.owners_of([{"id": 7, "name": "Ravi", "active_flag": False}, {"id": 8, "name": ""},
                                {"id": -1, "name": "X"}]) == {"pipedrive:user:7": "Ravi"}
    assert salesforce.owners_of([{"Id": "005SM000000146PYAQ", "Name": "Ana Lima"}, {"Id": None, "Name": "X"},
                                 {"Id": "005SM000000146QYAQ", "Name": None}]) == {
        "salesforce:005SM000000146PYAQ": "Ana Lima"}


def test_print_stage_map_on_the_command_line_prints_both_blocks(tmp_path, capsys):
    with PipedriveServer(pipedrive_doc()) as server:
        args = argparse.Namespace(crm="pipedrive", since=None, dry_run=False, print_stage_map=True,
                                  pipedrive_api_url=server.url, backfill_state_dir=str(tmp_path))
        with mock_env(FUNNEL_PIPEDRIVE_API_TOKEN=TOKEN):
            assert runner.run(args, Settings(broker="kafka://127.0.0.1:1")) == 0  # no broker is touched
    out = capsys.readouterr().out
    assert '  "pipedrive:user:18487522": "Chloë O\'Brien"\n' in out
    printed = yaml.safe_load(out)
    assert printed["owners"] == OWNERS["pipedrive"] and "default" in printed["stage_maps"]["pipedrive"]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_dry_run_counts_without_producing_and_a_bad_deal_is_reported_not_sent(tmp_path, capsys, caplog):
    doc = hubspot_doc()
    doc["deals"][1]["propertiesWithHistory"]["amount"][0]["value"] = "12,5"  # not a decimal number
    with HubSpotServer(doc) as server:
        args = argparse.Namespace(crm="hubspot", since=None, dry_run=True, print_stage_map=False,
                                  hubspot_api_url=server.url, backfill_state_dir=str(tmp_path),
                                  backfill_rate="100/1")
        with mock_env(FUNNEL_HUBSPOT_ACCESS_TOKEN=TOKEN):
            status = runner.run(args, Settings(broker="kafka://127.0.0.1:1"))  # no broker is touched
    out = capsys.readouterr()
    assert status == 1
    assert "backfill hubspot: 7 deals, would send" in out.out and "; 1 deal unreadable" in out.out
    assert "not a decimal number: '12,5'" in caplog.text  # logged (stderr in the CLI)
    assert list(tmp_path.iterdir()) == []  # a dry run writes no checkpoint


def test_credentials_only_from_the_environment_or_a_file(tmp_path, capsys):
    args = argparse.Namespace(crm="pipedrive", since=None, dry_run=True, print_stage_map=False)
    with mock_env():
        assert runner.run(args, Settings()) == 2
    assert "set FUNNEL_PIPEDRIVE_API_TOKEN or FUNNEL_PIPEDRIVE_API_TOKEN_FILE" in capsys.readouterr().err
    with mock_env(FUNNEL_PIPEDRIVE_API_TOKEN_FILE=str(tmp_path / "missing")):
        assert runner.run(args, Settings()) == 2
    assert "FUNNEL_PIPEDRIVE_API_TOKEN_FILE: cannot read" in capsys.readouterr().err
    (tmp_path / "token").write_text("s3cret\n")
    with mock_env(FUNNEL_PIPEDRIVE_API_TOKEN_FILE=str(tmp_path / "token")):
        assert BackfillSettings().secret("pipedrive_api_token") == "s3cret"


def test_a_checkpoint_from_another_since_is_refused(tmp_path, capsys):
    runner.Checkpoint(tmp_path, "hubspot").save({"cursor": "active:102", "deals": 2, "events": 9,
                                                 "since": None})
    args = argparse.Namespace(crm="hubspot", since="2025-11-05", dry_run=False, print_stage_map=False,
                              backfill_state_dir=str(tmp_path), hubspot_api_url="http://127.0.0.1:1")
    with mock_env(FUNNEL_HUBSPOT_ACCESS_TOKEN=TOKEN):
        assert runner.run(args, Settings()) == 2
    assert "interrupted run with --since None" in capsys.readouterr().err


@contextlib.contextmanager
def mock_env(**values: str):
    """The credential variables exactly as given, restored afterwards."""
    names = [f"FUNNEL_{name.upper()}{suffix}" for name in SECRETS for suffix in ("", "_FILE")]
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ.update(values)
    try:
        yield
    finally:
        for name in names:
            os.environ.pop(name, None)
            if saved[name] is not None:
                os.environ[name] = saved[name]


def test_a_refused_token_stops_the_run_with_the_reason(capsys, tmp_path):
    with PipedriveServer(pipedrive_doc()) as server:
        args = argparse.Namespace(crm="pipedrive", since=None, dry_run=True, print_stage_map=False,
                                  pipedrive_api_url=server.url, backfill_state_dir=str(tmp_path))
        with mock_env(FUNNEL_PIPEDRIVE_API_TOKEN="wrong"):
            assert runner.run(args, Settings()) == 2
        # a 401 is not retried: the count (only for the ETA), then the first page, which stops the run
        assert [key for _, key in server.arrivals] == ["/api/v1/deals/summary status= cursor=",
                                                      "/api/v2/deals status= cursor="]
    out = capsys.readouterr()
    assert out.err == ("funnel-kpi: backfill: pipedrive: active deals page failed after 1 try: HTTP 401 "
                       "(check the access token)\n")
    assert "no deal count (pipedrive: deal count failed after 1 try: HTTP 401" in out.out


def test_a_refused_token_is_one_line_from_the_command(tmp_path):
    """The real command: the refusal is the one line on stderr; the count's failure (it only
    feeds the ETA) is a notice on stdout."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUNNEL_")}
    with PipedriveServer(pipedrive_doc()) as server:
        result = cli("backfill", "pipedrive", "--dry-run", timeout=120, env={
            **clean, "FUNNEL_PIPEDRIVE_API_URL": server.url, "FUNNEL_PIPEDRIVE_API_TOKEN": "wrong",
            "FUNNEL_BACKFILL_STATE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr == ("funnel-kpi: backfill: pipedrive: active deals page failed after 1 try: "
                             "HTTP 401 (check the access token)\n")
    assert result.stdout == ("backfill pipedrive: no deal count (pipedrive: deal count failed after 1 try: "
                             "HTTP 401 (check the access token)); going on without a total or ETA\n")


@pytest.mark.parametrize("answer", ["500", "not a count"])
def test_a_failed_deal_count_only_drops_the_eta(answer, capsys, tmp_path):
    """The count is Pipedrive's undocumented /v1/deals/summary (a HubSpot search, a SOQL COUNT()):
    failing (after its retries) or answering nonsense, it leaves the progress bar without a total
    and the run goes on."""
    with PipedriveServer(pipedrive_doc()) as server:
        summary = "/api/v1/deals/summary status= cursor="
        if answer == "500":
            server.faults = {summary: ["500", "500"]}
        else:
            server.answer = (lambda plain: lambda request: (200, {"success": True, "data": [1]}, {})
                             if request.path == "/api/v1/deals/summary" else plain(request))(server.answer)
        args = argparse.Namespace(crm="pipedrive", since=None, dry_run=True, print_stage_map=False,
                                  pipedrive_api_url=server.url, backfill_state_dir=str(tmp_path),
                                  backfill_retries="1", backfill_rate="100/1")
        with mock_env(FUNNEL_PIPEDRIVE_API_TOKEN=TOKEN):
            status = runner.run(args, Settings(broker="kafka://127.0.0.1:1"))  # no broker is touched
        reader = pipedrive.Reader(settings(pipedrive_api_url=server.url, pipedrive_api_token=TOKEN), CTX)
        deals = read_all(reader).deals
    out = capsys.readouterr()
    assert status == 0, out.err
    assert f"backfill pipedrive: {deals} deals, would send" in out.out
    if answer == "500":
        assert server.played == {summary: ["500", "500"]}
        assert ("backfill pipedrive: no deal count (pipedrive: deal count failed after 2 tries: HTTP 500); "
                "going on without a total or ETA") in out.out
    else:
        assert "backfill pipedrive: no deal count (unreadable answer, AttributeError" in out.out
    assert "Traceback" not in out.err


def test_a_single_currency_salesforce_org_is_read_without_currency_iso_code(tls):
    """Most orgs have one currency and no Opportunity.CurrencyIsoCode: the refused query is asked
    again without it (one call more), and the deals are those of the live session, with no
    currency (CDC sends none there either), so they count in the config's default_currency."""
    context, cert = tls
    with SalesforceServer(salesforce_doc(), context, multi_currency=False) as server:
        reader = salesforce.Reader(salesforce_settings(server, cert), CTX)
        read = read_all(reader)
        refused = [k for _, k in server.arrivals if "CurrencyIsoCode" in k]
        assert refused == [f"/services/data/v59.0/queryAll/ {salesforce.OPPORTUNITY[:60]}"]
        assert reader.opportunity == salesforce.SINGLE_CURRENCY
        resumed = list(reader.pages("006SM0000001Tb5YAE"))  # asks without the field straight away
        assert sum(p.deals for p in resumed) > 0
        assert sum("CurrencyIsoCode" in k for _, k in server.arrivals) == 1
    assert read.rejects == []
    assert all("currency" not in event for event in read.events)
    deals, _ = apply(read.events)
    live, _ = apply([{k: v for k, v in e.items() if k != "currency"} for e in live_events("salesforce")])
    assert set(deals) >= set(live)
    for deal_id, deal in live.items():
        assert kpi_state(deals[deal_id]) == kpi_state(deal), deal_id
    assert len(deals["salesforce:006SM0000001Tc1YAE"].history) == 60


OTHER_CUSTOM = "0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b"  # a custom field no dimension names


def with_dimensions(crm: str, doc: dict) -> tuple[dict, dict]:
    """The CRM's test answers with a custom field and a standard one of the configured dimensions
    (and a field that is not one) on a deal; and the values it must end with."""
    if crm == "hubspot":
        deal = doc["deals"][0]  # 101
        history = {"region_custom": [("APAC", "2025-11-05"), ("EMEA", "2025-11-03")],
                   "dealtype": [("", "2025-11-06"), ("newbusiness", "2025-11-03")],
                   "description": [("not a dimension", "2025-11-03")]}
        for name, values in history.items():
            deal["properties"][name] = values[0][0]
            deal["propertiesWithHistory"][name] = [
                {"value": value, "timestamp": f"{day}T09:00:00.000Z", "sourceType": "CRM_UI"}
                for value, day in values]
        return doc, {"hubspot:deal:101": {"region": "APAC", "segment": None}}
    if crm == "pipedrive":
        deal = doc["deals"][0]  # 1
        deal.update(label=9, custom_fields={PIPEDRIVE_REGION: 12, OTHER_CUSTOM: "x"})
        doc["flows"]["1"].insert(0, {"object": "dealChange", "timestamp": "2025-11-07 09:00:00", "data": {
            "id": 9901, "item_id": 1, "field_key": PIPEDRIVE_REGION, "old_value": "11", "new_value": "12",
            "log_time": "2025-11-07 09:00:00", "change_source": "app"}})
        return doc, {"pipedrive:deal:1": {"region": "12", "segment": "9"}}
    opp = doc["opportunities"][0]
    opp.update(Region__c="EMEA", Type=None)
    doc["field_history"] = [
        {"attributes": {"type": "OpportunityFieldHistory"}, "Id": f"017SM00000000{i:02d}YAE",
         "OpportunityId": opp["Id"], "Field": field, "NewValue": value,
         "CreatedDate": f"2025-11-0{3 + i}T09:00:00.000+0000"}
        for i, (field, value) in enumerate([("Region__c", "APAC"), ("Type", "New Customer"),
                                            ("Region__c", "EMEA"), ("Type", None)])]
    return doc, {f"salesforce:{opp['Id']}": {"region": "EMEA", "segment": None}}


@pytest.mark.parametrize("crm", ["hubspot", "pipedrive", "salesforce"])
def test_backfills_request_and_read_the_configured_dimensions(crm, tls):
    context, cert = tls
    doc, expected = with_dimensions(crm, {"hubspot": hubspot_doc, "pipedrive": pipedrive_doc,
                                          "salesforce": salesforce_doc}[crm]())
    server = {"hubspot": lambda: HubSpotServer(doc), "pipedrive": lambda: PipedriveServer(doc),
              "salesforce": lambda: SalesforceServer(doc, context)}[crm]()
    with server:
        options = {"hubspot": {"hubspot_api_url": server.url, "hubspot_access_token": TOKEN},
                   "pipedrive": {"pipedrive_api_url": server.url, "pipedrive_api_token": TOKEN},
                   "salesforce": {"salesforce_instance_url": server.url, "salesforce_access_token": TOKEN,
                                  "salesforce_ca_bundle": cert}}[crm]
        reader = {"hubspot": hubspot, "pipedrive": pipedrive, "salesforce": salesforce}[crm].Reader(
            settings(**options), DIMS_CTX)
        read = read_all(reader)
    assert read.rejects == []
    found = latest_properties(read.events)
    assert {deal: found[deal] for deal in expected} == expected  # servers answer only what is asked
    if crm == "salesforce":
        (opportunities, *_) = [q for q in server.queries if "FROM Opportunity " in q]
        assert ", Region__c, Type FROM Opportunity" in opportunities
        assert any("FROM OpportunityFieldHistory" in q and "Field IN ('Region__c','Type')" in q
                   for q in server.queries)
    if crm == "pipedrive":
        assert {query.get("custom_fields") for query in server.deal_queries} == {PIPEDRIVE_REGION}


def test_salesforce_without_field_history_reads_the_dimensions_as_they_are(tls):
    context, cert = tls
    doc, expected = with_dimensions("salesforce", salesforce_doc())
    with SalesforceServer(doc, context, field_history=False) as server:
        reader = salesforce.Reader(salesforce_settings(server, cert), DIMS_CTX)
        read = read_all(reader)
    assert read.rejects == [] and not reader.field_history
    assert sum("FROM OpportunityFieldHistory" in q for q in server.queries) == 1  # asked once only
    found = latest_properties(read.events)
    assert {deal: found[deal] for deal in expected} == expected
