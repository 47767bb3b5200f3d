"""``funnel-kpi backfill``: a CRM's current deals and their history as canonical events.

One module per CRM reads its public REST API (``hubspot``, ``pipedrive``, ``salesforce``) and
turns each deal's history into the payloads its live adapter reads (webhook bodies, CDC events),
so backfill and live events are made by the same code; ``runner`` pages, produces, checkpoints.
"""
