"""The stream engine this project is tested on: :mod:`streams.worker.faust_patches` replaces a
private factory of faust-streaming and sets a private attribute of aiokafka's consumer. Another
release may rename or stop calling what the patch replaces, so the worker refuses to start on
other versions of these two unless told otherwise."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from streams.kafka.startup import StartupError

log = logging.getLogger("funnel_kpi")

# Keep equal to the exact pins in pyproject.toml (tests/test_engine.py checks).
TESTED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}


def _installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def untested(installed: Callable[[str], str] = _installed) -> dict[str, str]:
    """Package -> installed version, for those that differ from :data:`TESTED`."""
    found = {name: installed(name) for name in TESTED}
    return {name: found[name] for name in TESTED if found[name] != TESTED[name]}


def check_engine(allow_untested: bool) -> None:
    """Refuse (or, when allowed, warn about) an untested faust-streaming or aiokafka."""
    found = untested()
    if not found:
        return
    described = ", ".join(f"{name} {found[name]} (tested: {TESTED[name]})" for name in found)
    if allow_untested:
        log.warning("untested stream engine: %s; running anyway (FUNNEL_ALLOW_UNTESTED_ENGINE)", described)
        return
    raise StartupError(
        f"untested stream engine: {described}; streams/worker/faust_patches.py replaces a private "
        "part of them, and another release may stop calling it. Install the locked versions (pip "
        "install --require-hashes -r requirements.lock), or set FUNNEL_ALLOW_UNTESTED_ENGINE=true "
        "if tests/test_engine.py passes on these versions"
    )
