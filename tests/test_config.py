"""Funnel config: the shipped default loads; mistakes fail with the file and the field."""

import pytest

from models.config import DEFAULT_CONFIG, NO_TEAM, ConfigError, load_config, parse_duration
from sinks.config_gauges import config_gauges


def write(tmp_path, text):
    path = tmp_path / "funnel.yaml"
    path.write_text(text)
    return path


BASE = """
pipelines:
  default:
    stages:
      - {name: lead, section: tofu, probability: 0.1, stall_after: 12h}
      - {name: won, section: bofu, probability: 1, outcome: won}
      - {name: lost, section: bofu, probability: 0, outcome: lost}
"""


def test_shipped_config_loads():
    config = load_config(DEFAULT_CONFIG)
    stages = config.pipelines["default"].stages
    assert [s.name for s in stages] == ["lead", "mql", "sql", "opportunity", "won", "lost"]
    assert all(s.stall_after == 30 * 86400 for s in stages if s.is_open)
    assert config.map_stage("csv", "default", "Engaging") == "opportunity"
    assert config.map_stage("salesforce", "default", "Closed Won") == "won"


def test_minimal_config(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.pipelines["default"].stages[0].stall_after == 43200
    assert config.default_currency == "USD"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("pipelines: [", "not valid YAML"),
        ("- a list", "mapping at the top level"),
        (BASE.replace("12h", "soon"), "not a duration"),
        (BASE.replace("default:", "other:"), "'default' must be configured"),
        (BASE + "stage_maps: {hubspot: {default: {x: nowhere}}}", "'nowhere' is not a stage"),
        (BASE + "timezone: Mars/Olympus", "unknown timezone"),
        (BASE + "targets: {default: {usd: {month: 1}}}", "ISO 4217"),
        (BASE + "surprise: 1", "surprise"),
        (BASE.replace("outcome: lost", "outcome: won"), "exactly one won and one lost"),
        (BASE.replace("probability: 0.1", "probability: 2"), "probability"),
        (BASE + "owners: {123: Jane Doe}", "owner id 123 must be a non-empty string (quote it)"),
        (BASE + "owners: {'hubspot:owner:1': ''}", "hubspot:owner:1: the name must be a non-empty string"),
        (BASE + "owners: {'pipedrive:user:2': 7}", "pipedrive:user:2: the name must be a non-empty string"),
        (BASE + "owners: [Jane Doe]", "owners: Input should be a valid dictionary"),
        (BASE + "owners: {ann: {team: East}}", "ann: the name must be a non-empty string, not None"),
        (BASE + "owners: {ann: {name: Ann, team: ''}}", "ann: the team must be a non-empty string, not ''"),
        (BASE + "owners: {ann: {name: Ann, team: 3}}", "ann: the team must be a non-empty string, not 3"),
        (BASE + "owners: {ann: {name: Ann, teams: East}}",
         "ann: unknown key 'teams' (an owner has name and team)"),
        (BASE + "owners: {ann: {name: Ann}, 7: {name: Bo, team: East}}",
         "owner id 7 must be a non-empty string"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert words in str(err.value)
    if "owners" in text:  # one clear line (a YAML syntax error quotes the line it is on)
        assert "\n" not in str(err.value)


def test_owners_map_ids_to_display_names(tmp_path):
    text = BASE + ('owners: {"hubspot:owner:123": "Jane \\"JD\\" Doe: EMEA",\n'
                   '         "salesforce:005x": "Zoë Ångström"}\n')
    config = load_config(write(tmp_path, text))
    assert config.owners == {"hubspot:owner:123": 'Jane "JD" Doe: EMEA', "salesforce:005x": "Zoë Ångström"}
    assert load_config(write(tmp_path, BASE)).owners == {}


def test_owners_give_reps_a_team_or_none(tmp_path):
    text = BASE + ('owners:\n'
                   '  "hubspot:owner:1": {name: Jane Doe, team: EMEA}\n'
                   '  "hubspot:owner:2": Li Wei\n'
                   '  "hubspot:owner:3": {name: Ana Lima}\n')
    config = load_config(write(tmp_path, text))
    assert config.owner_names == {"hubspot:owner:1": "Jane Doe", "hubspot:owner:2": "Li Wei",
                                  "hubspot:owner:3": "Ana Lima"}
    assert [config.team_of(f"hubspot:owner:{i}") for i in (1, 2, 3, 4)] == ["EMEA", NO_TEAM, NO_TEAM, NO_TEAM]
    assert NO_TEAM == "none" and config.has_teams
    names_only = load_config(write(tmp_path, BASE + "owners: {ann: Ann, bo: {name: Bo}}"))
    assert not names_only.has_teams and names_only.owner_names == {"ann": "Ann", "bo": "Bo"}


def test_the_owner_gauge_carries_name_and_team(tmp_path):
    config = load_config(write(tmp_path, BASE + "owners: {ann: {name: Ann, team: East}, bo: Bo}"))
    (family,) = [m for m in config_gauges(config, "0", 0) if m.name == "funnel_owner_info"]
    assert [(s.labels, s.value) for s in family.samples] == [
        ({"owner": "ann", "name": "Ann", "team": "East"}, 1),
        ({"owner": "bo", "name": "Bo", "team": "none"}, 1),
    ]


def test_open_stage_after_closed_is_refused(tmp_path):
    text = BASE + "      - {name: late, section: tofu, probability: 0.1}\n"
    with pytest.raises(ConfigError, match="comes after a closed stage"):
        load_config(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "seconds"), [("30d", 2592000), ("90m", 5400), ("45s", 45),
                                                 ("2w", 1209600), (3600, 3600), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
