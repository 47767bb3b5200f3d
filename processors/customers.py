"""Customer credits (won contributions re-keyed by account) applied to the ``customers`` table."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import orjson

from models.aggregates import Contribution, customer_contribution
from models.deal_codec import compact
from processors.credits import decode_credit
from processors.folds import PartitionFolds
from processors.records import Record, Rejection

Totals = dict[tuple[str, str], list[int]]  # (pipeline, currency) → [credited deals, won micro]


class LegacyCustomerRow(ValueError):
    """A customers row of the format before issue 18 (one row per account)."""


def customer_key(account: str, deal_id: str) -> str:
    return f"{account}\x00{deal_id}"


@dataclass(slots=True)
class CustomerBatch:
    """A batch's rows to write (None deletes) and the account totals they lead to, applied to
    the processor by :meth:`CustomerProcessor.commit` once the rows are in the changelog."""

    writes: list[tuple[str, bytes | None, int]] = field(default_factory=list)  # (key, row, partition)
    totals: dict[str, tuple[int, Totals]] = field(default_factory=dict)  # account → (partition, totals)
    rejections: list[Rejection] = field(default_factory=list)  # credits that do not decode


class CustomerProcessor:
    """The ``customers`` table: one row per credited (account, deal), the deal's absolute won
    contribution, so a row stays small however many deals an account wins (one row per
    account held every deal and outgrew a producer request at ~15,000). Re-sent credits
    overwrite their row (idempotent); a credit taken back deletes it. The folds count per
    account, from per-account totals kept in memory and rebuilt with the folds.

    A batch changes nothing in memory until :meth:`commit`: a batch whose rows did not reach the
    changelog is simply read again."""

    def __init__(self) -> None:
        self.folds = PartitionFolds()
        self.totals: dict[str, Totals] = {}

    def contributions_of_stored(self, values: Iterable[bytes]) -> Iterator[tuple[int, Contribution]]:
        """Every stored account's contribution (recomputes the per-account totals)."""
        totals: dict[str, Totals] = {}
        partitions: dict[str, int] = {}
        for raw in values:
            row = orjson.loads(raw)
            if len(row) != 5:
                raise LegacyCustomerRow(
                    "the customers table holds rows of the format before issue 18 (one row per "
                    "account): rebuild under a new FUNNEL_APP_ID (docs/operations.md, "
                    "\"Upgrading from a version before issue 18\")")
            partition, account, pipeline, currency, micro = row
            partitions[account] = partition
            _add_credit(totals.setdefault(account, {}), pipeline, currency, micro, 1)
        self.totals = totals
        for account, by_key in totals.items():
            yield partitions[account], customer_contribution(account, _micro(by_key))

    def process(self, records: list[Record], load: Callable[[str], bytes | None]) -> CustomerBatch:
        batch = CustomerBatch()
        rows: dict[str, tuple[bytes | None, int]] = {}
        for record in records:
            if record.key is None or record.value is None:
                continue
            try:
                deal_id, pipeline, currency, micro = decode_credit(record.value)
            except ValueError as exc:
                batch.rejections.append(Rejection(record, "invalid_credit", str(exc)))
                continue
            account = record.key.decode()
            staged = batch.totals.get(account)
            if staged is None:
                copied = {key: list(entry) for key, entry in self.totals.get(account, {}).items()}
                staged = batch.totals[account] = (record.partition, copied)
            totals = staged[1]
            key = customer_key(account, deal_id)
            old = rows[key][0] if key in rows else load(key)
            if old is not None:
                _add_credit(totals, *orjson.loads(old)[2:], -1)
            row = None
            if micro is not None:
                _add_credit(totals, pipeline, currency, micro, 1)
                row = compact(orjson.dumps([record.partition, account, pipeline, currency, micro]))
            rows[key] = (row, record.partition)
        batch.writes = [(key, row, partition) for key, (row, partition) in rows.items()]
        return batch

    def commit(self, batch: CustomerBatch) -> None:
        """The batch's rows are in the changelog: move the totals and folds with them."""
        for account, (partition, totals) in batch.totals.items():
            before = customer_contribution(account, _micro(self.totals.get(account, {})))
            after = customer_contribution(account, _micro(totals))
            self.folds.fold(partition).replace(before, after)
            if totals:
                self.totals[account] = totals
            else:
                self.totals.pop(account, None)


def _add_credit(totals: Totals, pipeline: str, currency: str, micro: int, sign: int) -> None:
    entry = totals.setdefault((pipeline, currency), [0, 0])
    entry[0] += sign
    entry[1] += sign * micro
    if not entry[0]:
        del totals[(pipeline, currency)]


def _micro(totals: Totals) -> dict[tuple[str, str], int]:
    return {key: micro for key, (_, micro) in totals.items()}
