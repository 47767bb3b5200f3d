"""What a company checks before approving a release: a licence no dependency forbids, the licence
field, a changelog, one version (pyproject.toml) that `funnel-kpi --version`, the code and the
image labels all show, and the release procedure written down."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from streams.version import VERSION

from .conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Licences that would oblige the project (or whoever ships its image) to publish their own code.
STRONG_COPYLEFT = re.compile(r"\b(A?GPL|GNU (Affero )?General Public|SSPL|Server Side Public|EUPL|OSL)\b",
                             re.I)


def test_the_licence_is_apache_2_0_in_the_file_and_the_package_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]


def licence_texts(package: str) -> list[str] | None:
    try:
        meta = distribution(package).metadata
    except PackageNotFoundError:
        return None
    texts = [meta.get("License-Expression") or "", (meta.get("License") or "")[:200]]
    return texts + [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]


def test_no_runtime_dependency_has_a_licence_that_forbids_apache_2_0():
    """Every package of the image (requirements.lock) that the venv holds: no strong copyleft."""
    packages = re.findall(r"^([A-Za-z0-9][\w.-]*)==", (ROOT / "requirements.lock").read_text(), re.M)
    found = {package: licence_texts(package) for package in packages}
    checked = {package: texts for package, texts in found.items() if texts is not None}
    assert len(checked) > 40, f"only {sorted(checked)} installed"
    forbidding = {package: texts for package, texts in checked.items()
                  if any(STRONG_COPYLEFT.search(text) for text in texts)}
    assert not forbidding, forbidding


def test_the_copyleft_check_recognises_what_it_must_refuse():
    for text in ("GPL-3.0-only", "AGPL-3.0-or-later", "SSPL-1.0",
                 "License :: OSI Approved :: GNU General Public License v3 (GPLv3)"):
        assert STRONG_COPYLEFT.search(text), text
    for text in ("Apache-2.0", "MIT", "BSD-3-Clause", "MPL-2.0", "PSF-2.0",
                 "License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)"):
        assert not STRONG_COPYLEFT.search(text), text


def test_the_changelog_follows_keep_a_changelog_with_an_entry_for_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "Keep a Changelog" in text and "Semantic Versioning" in text
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, re.M)
    assert headings[0] == ("Unreleased", "")
    assert (PROJECT["version"], ) == tuple(v for v, _ in headings[1:2]), headings
    assert all(date for _, date in headings[1:]), "every release entry carries its date"
    sections = set(re.findall(r"^### (\w+)$", text, re.M))
    assert sections <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, sections


def test_funnel_kpi_version_prints_the_package_version():
    """The installed command, as a user runs it; its version is pyproject.toml's (one source)."""
    command = Path(sys.executable).parent / "funnel-kpi"
    result = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"funnel-kpi {PROJECT['version']}\n"
    assert result.stderr == ""
    assert PROJECT["version"] == VERSION


def test_the_image_carries_oci_labels_with_the_version_licence_and_source():
    text = (ROOT / "Dockerfile").read_text()
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', text))
    assert labels["org.opencontainers.image.licenses"] == PROJECT["license"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.source"] == "${SOURCE}"
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    assert {"title", "description", "created"} <= {name.rsplit(".", 1)[1] for name in labels}
    args = re.findall(r"^ARG (\w+)", text, re.M)
    assert {"VERSION", "SOURCE", "REVISION", "CREATED"} <= set(args)
    # a release VERSION other than the package's stops the build; LICENSE is in the image
    assert 'from streams.version import VERSION' in text and '"$VERSION" = "$installed"' in text
    assert re.search(r"^COPY .*\bLICENSE\b", text, re.M)


def test_releasing_md_says_how_a_tag_becomes_an_image_and_what_an_upgrade_reads():
    text = (ROOT / "docs" / "releasing.md").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    for arg in re.findall(r"^ARG (\w+)", dockerfile, re.M):
        assert f"--build-arg {arg}=" in text, arg
    for needed in ("CHANGELOG.md", "operations.md", "git tag", "pyproject.toml", "funnel-kpi --version"):
        assert needed in text, needed
