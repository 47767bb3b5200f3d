"""HTTP edges: the webhook receiver and the KPI API."""
