"""CRM input: source adapters, the adapt service and backfills."""
