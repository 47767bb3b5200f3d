"""Erasure of people by pseudonym: requests carry only the pseudonym, deals are matched by it."""

from __future__ import annotations

from functools import lru_cache

import msgspec
import orjson

from models.deal import Deal, Field, erased_name
from models.event import Change
from processors.records import Record

pseudonym_of = lru_cache(maxsize=1 << 16)(erased_name)  # names repeat: reps and accounts


def erasure_pseudonym(record: Record) -> str | None:
    """The pseudonym a ``funnel.erasures`` request carries (None: not a request)."""
    try:
        pseudonym = orjson.loads(record.value or b"null")["pseudonym"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    return pseudonym if isinstance(pseudonym, str) and pseudonym.startswith("erased:") else None


def masked(change: Change, erased: set[str]) -> Change:
    """The event with each erased owner or account replaced by its pseudonym."""
    owner, account = change.owner, change.account
    if owner is not None and pseudonym_of(owner) in erased:
        owner = pseudonym_of(owner)
    if account is not None and pseudonym_of(account) in erased:
        account = pseudonym_of(account)
    if owner is change.owner and account is change.account:
        return change
    return msgspec.structs.replace(change, owner=owner, account=account)


def pseudonymise(deal: Deal, erased: set[str]) -> list[str] | None:
    """Replace each owner and account of the deal whose pseudonym is in ``erased`` by it: None
    when none was found, else the credited accounts replaced (their credits move)."""
    found = False
    for i, (ts, event_id, owner) in enumerate(deal.owners):
        if pseudonym_of(owner) in erased:
            deal.owners[i] = (ts, event_id, pseudonym_of(owner))
            found = True
    account = deal.account
    if account is not None and isinstance(account.value, str) and pseudonym_of(account.value) in erased:
        deal.account = Field(pseudonym_of(account.value), account.ts, account.event_id)
        found = True
    replaced = [name for name in deal.credited_accounts if pseudonym_of(name) in erased]
    if replaced:
        deal.credited_accounts = [pseudonym_of(name) if name in replaced else name
                                  for name in deal.credited_accounts]
    return replaced if found or replaced else None
