"""How a deal is stored: compactly as an orjson list, each version written once (see
:func:`encode_deal`), because a table holds millions."""

from __future__ import annotations

import orjson

from models.deal import Deal, Field

FORMAT = 2  # stored layout version of a deal (decode_deal reads 1 as well)


def _unpack(packed: list | None) -> Field | None:
    return None if packed is None else Field(packed[0], packed[1], packed[2])


def compact(raw: bytes) -> bytes:
    """An exact-size copy: orjson's bytes keep a 4 KiB allocation behind short values, which
    would cost ~4 KiB of memory per stored deal instead of ~300 bytes."""
    return bytes(memoryview(raw))


def encode_deal(deal: Deal) -> bytes:
    """``[FORMAT, deal_id, partition, versions, 6 × field, history, owners, recent_ids,
    credited_accounts, stall_alert, properties?]`` (``properties``, ``{name: field}``, only when
    the deal has any: builds before it read the first 15 items): ``versions`` lists each
    distinct (ts, event id) once, flat, and fields (``[value, version]``), stage and owner
    entries (``[version, value]``) and recent ids (a version, or the id of an event that
    changed nothing) point into it. One event usually sets several fields and a stage: an
    open deal takes ~200 bytes, not ~290."""
    # A deal holds one version per event id (apply_change never applies an id it still
    # holds), so the id alone names the version: event id → its index in ``versions``.
    refs: dict[str, int] = {}
    versions: list = []
    add_version = versions.append
    fields: list = []
    # The scalars in _SCALARS order, spelled out: this runs for every write.
    for current in (deal.pipeline, deal.amount, deal.currency, deal.account,
                    deal.expected_close_at, deal.deleted):
        if current is None:
            fields.append(None)
            continue
        eid = current.event_id
        ref = refs.get(eid)
        if ref is None:
            ref = refs[eid] = len(refs)
            add_version(current.ts)
            add_version(eid)
        fields.append([current.value, ref])
    history = []
    for ts, eid, value in deal.history:
        ref = refs.get(eid)
        if ref is None:
            ref = refs[eid] = len(refs)
            add_version(ts)
            add_version(eid)
        history.append([ref, value])
    owners = []
    for ts, eid, value in deal.owners:
        ref = refs.get(eid)
        if ref is None:
            ref = refs[eid] = len(refs)
            add_version(ts)
            add_version(eid)
        owners.append([ref, value])
    properties = {}
    for name, current in deal.properties.items():
        eid = current.event_id
        ref = refs.get(eid)
        if ref is None:
            ref = refs[eid] = len(refs)
            add_version(current.ts)
            add_version(eid)
        properties[name] = [current.value, ref]
    recent = []  # a loop, not a comprehension: see decode_deal
    for eid in deal.recent_ids:
        recent.append(refs.get(eid, eid))
    doc = [FORMAT, deal.deal_id, deal.partition, versions, *fields, history, owners, recent,
           deal.credited_accounts, deal.stall_alert]
    if properties:
        doc.append(properties)
    return bytes(memoryview(orjson.dumps(doc)))  # compact(), inlined


def decode_deal(raw: bytes) -> Deal:
    doc = orjson.loads(raw)
    if doc[0] == 1:
        return _decode_format_1(doc)
    if doc[0] != FORMAT:
        raise ValueError(f"deal stored in format {doc[0]}, this build reads 1 and {FORMAT}")
    properties = doc[15] if len(doc) > 15 else None  # later builds may add more: ignored
    # Unpacked in one statement and spelled out below: this runs for every deal loaded.
    (_, deal_id, partition, versions, pipeline, amount, currency, account, expected, deleted,
     history, owners, recent, credited, stall_alert) = doc[:15]
    ts_of, id_of = versions[0::2], versions[1::2]
    # Loops, not comprehensions: these lists are short, and a comprehension's own call costs
    # more than it saves on so few items.
    stages = []
    for i, stage in history:
        stages.append((ts_of[i], id_of[i], stage))
    assigned = []
    for i, owner in owners:
        assigned.append((ts_of[i], id_of[i], owner))
    recent_ids = []
    for x in recent:
        recent_ids.append(id_of[x] if x.__class__ is int else x)
    fields = {}
    if properties:
        for name, (value, i) in properties.items():
            fields[name] = Field(value, ts_of[i], id_of[i])
    return Deal(
        deal_id, partition,
        None if pipeline is None else Field(pipeline[0], ts_of[pipeline[1]], id_of[pipeline[1]]),
        None if amount is None else Field(amount[0], ts_of[amount[1]], id_of[amount[1]]),
        None if currency is None else Field(currency[0], ts_of[currency[1]], id_of[currency[1]]),
        None if account is None else Field(account[0], ts_of[account[1]], id_of[account[1]]),
        None if expected is None else Field(expected[0], ts_of[expected[1]], id_of[expected[1]]),
        None if deleted is None else Field(deleted[0], ts_of[deleted[1]], id_of[deleted[1]]),
        stages, assigned, recent_ids, credited, stall_alert, fields,
    )


def _decode_format_1(doc: list) -> Deal:
    """Deals written before versions were shared: every field and entry spelled out."""
    return Deal(
        doc[1], doc[2], _unpack(doc[3]), _unpack(doc[4]), _unpack(doc[5]), _unpack(doc[6]),
        _unpack(doc[7]), _unpack(doc[8]), list(map(tuple, doc[9])), list(map(tuple, doc[10])),
        doc[11], doc[12], doc[13],
    )
