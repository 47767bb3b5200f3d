"""Being a good API citizen: a request-rate limit, retries with backoff, counted calls.

Every API request of a backfill goes through :meth:`Api.call`, whatever client makes it
(hubspot-api-client, simple-salesforce, requests): the rate limit holds for retries too, and
429 / 5xx / timeouts are retried after ``Retry-After`` or an exponential backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import requests
import urllib3

if TYPE_CHECKING:
    from streams.crm.backfill.settings import BackfillSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT = (requests.Timeout, requests.ConnectionError, urllib3.exceptions.HTTPError, TimeoutError,
              ConnectionError)
# A certificate that fails verification does not heal by retrying.
_PERMANENT = (requests.exceptions.SSLError, urllib3.exceptions.SSLError)
MAX_BACKOFF = 60.0


_HINTS = {401: " (check the access token)", 403: " (check the token's scopes and the user's permissions)"}


class ApiError(Exception):
    """A request that failed for good (not transient, or still failing after every retry)."""

    def __init__(self, crm: str, what: str, exc: BaseException, tries: int) -> None:
        self.status, _ = status_of(exc)
        failure = f"HTTP {self.status}" if self.status is not None else f"{type(exc).__name__}: {exc}"
        attempts = "1 try" if tries == 1 else f"{tries} tries"
        super().__init__(f"{crm}: {what} failed after {attempts}: {failure}{_HINTS.get(self.status, '')}")


class RateLimit:
    """At most ``requests`` calls in any ``window`` seconds: a sliding window over the last calls.

    ``margin`` seconds are added to the window, so that the server, which sees the requests a
    little later and unevenly, never counts more than ``requests`` in one of its windows.
    """

    def __init__(self, requests: int, window: float, margin: float = 0.05) -> None:
        self.requests, self.window = requests, window + margin
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._times and now - self._times[0] >= self.window:
                    self._times.popleft()
                if len(self._times) < self.requests:
                    self._times.append(now)
                    return
                time.sleep(self._times[0] + self.window - now)


def status_of(exc: BaseException) -> tuple[int | None, Any]:
    """(HTTP status, response headers) of a client's error, whichever client raised it."""
    response = getattr(exc, "response", None)
    if isinstance(response, requests.Response):
        return response.status_code, response.headers
    status = getattr(exc, "status", None)
    return (status if isinstance(status, int) else None), getattr(exc, "headers", None)


def retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: use the backoff instead


class Api:
    """One CRM's request pacing and retry policy; counts calls and retries for the report."""

    def __init__(self, name: str, limit: RateLimit, retries: int, backoff: float = 0.5) -> None:
        self.name, self.limit, self.retries, self.backoff = name, limit, retries, backoff
        self.calls = 0
        self.retried = 0

    @classmethod
    def for_crm(cls, name: str, settings: BackfillSettings, default_rate: str) -> Api:
        """Paced by ``FUNNEL_BACKFILL_RATE`` (else the CRM's default), ``FUNNEL_BACKFILL_RETRIES``."""
        return cls(name, RateLimit(*settings.rate(default_rate)), settings.backfill_retries)

    def call(self, what: str, request: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            self.limit.wait()
            self.calls += 1
            try:
                return request()
            except Exception as exc:  # classified below, re-raised when final
                delay = self._delay(exc, attempt)
                if delay is None or attempt == self.retries:
                    raise ApiError(self.name, what, exc, attempt + 1) from exc
                self.retried += 1
                log.warning("%s: %s failed (%s); retry %d in %.1fs", self.name, what,
                            _short(exc), attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _delay(self, exc: Exception, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when the error is not transient."""
        status, headers = status_of(exc)
        backoff = min(MAX_BACKOFF, self.backoff * 2**attempt)
        if status in RETRY_STATUS:
            return retry_after(headers) or backoff
        if status is None and isinstance(exc, _TRANSIENT) and not isinstance(exc, _PERMANENT):
            return backoff
        return None


def _short(exc: BaseException) -> str:
    status, _ = status_of(exc)
    return f"HTTP {status}" if status is not None else type(exc).__name__


class TimeoutSession(requests.Session):
    """A requests session whose every request has a timeout (requests has no default) and uses
    the session's ``verify`` (requests lets ``REQUESTS_CA_BUNDLE`` override it otherwise)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("verify", self.verify)
        return super().request(*args, **kwargs)
