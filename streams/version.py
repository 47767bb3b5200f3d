"""The package version: one source, ``version`` in pyproject.toml, read from the installed
package's metadata (``pip install .`` or ``-e .``); a source tree that was never installed says
``0.0.0+source``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "funnel-kpi"

try:
    VERSION = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0+source"
