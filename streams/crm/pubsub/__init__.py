"""``funnel-kpi salesforce-cdc``: Salesforce Change Data Capture over the Pub/Sub API (gRPC) →
``crm.raw.salesforce``. ``pubsub_api.proto`` is Salesforce's official proto (CC0), the
``pubsub_api_pb2*.py`` beside it are generated from it by ``make proto`` (docs/design.md §7)."""
