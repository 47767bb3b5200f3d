"""Customer credits: a won deal's contribution re-keyed by its account (the ``customers`` table
sums them per account, on the account's partition)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from models.aggregates import WON_REVENUE, Contribution
from models.deal import Deal

# Accounts a deal remembers having credited: a renamed account's credit must be taken back.
MAX_CREDITED_ACCOUNTS = 4
CreditOf = tuple[str, str, str, int]  # (account, pipeline, currency, won micro)


@dataclass(slots=True)
class Credit:
    """Absolute won contribution of a deal to an account (``micro`` None = no contribution)."""

    account: str
    deal_id: str
    pipeline: str | None = None
    currency: str | None = None
    micro: int | None = None

    def encode(self) -> bytes:
        return orjson.dumps([self.deal_id, self.pipeline, self.currency, self.micro])


def decode_credit(raw: bytes) -> tuple[str, str | None, str | None, int | None]:
    """A credit's ``(deal id, pipeline, currency, micro)``; ValueError when ``raw`` is not one
    (the credits topic is the workers' own, but a foreign producer or another version may
    write it: a bad credit must not stop the loop)."""
    try:
        deal_id, pipeline, currency, micro = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a credit [deal id, pipeline, currency, micro]: {exc}") from None
    if not isinstance(deal_id, str) or not (micro is None or (
            type(micro) is int and isinstance(pipeline, str) and isinstance(currency, str))):
        raise ValueError("not a credit [deal id, pipeline, currency, micro]: wrong types")
    return deal_id, pipeline, currency, micro


def credit_of(deal: Deal, contribution: Contribution) -> CreditOf | None:
    """What a won deal with an account credits it, else None."""
    account = deal.value("account")
    if not account:
        return None
    for family, key, value in contribution:
        if family == WON_REVENUE:
            return account, key[0], key[1], value  # type: ignore[return-value]
    return None


def recredit(deal: Deal, credit: CreditOf | None) -> tuple[list[Credit], bool]:
    """The credits that leave ``credit`` as the deal's only one (taken back from every other
    account it credited), and whether the deal's list of credited accounts grew."""
    account = credit[0] if credit else None
    credits = [Credit(old, deal.deal_id) for old in deal.credited_accounts if old != account]
    if credit is None:
        return credits, False
    credits.append(Credit(credit[0], deal.deal_id, credit[1], credit[2], credit[3]))
    if account in deal.credited_accounts:
        return credits, False
    deal.credited_accounts.append(credit[0])
    del deal.credited_accounts[:-MAX_CREDITED_ACCOUNTS]
    return credits, True
