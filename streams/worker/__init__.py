"""The worker: Faust wiring, the batch loop, outbox, tables, KPI publisher."""
