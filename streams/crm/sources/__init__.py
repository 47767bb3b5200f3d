"""CRM adapters: each source's own change format → canonical CRM events v1 (docs/design.md §2).

One module per source, each a pure function from a raw payload to :class:`~.common.Adapted`.
The HTTP edge (:mod:`streams.http.ingest`) and the bridge (:mod:`streams.crm.adapt`) do the I/O.
"""
