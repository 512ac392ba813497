"""Event contracts: typed events (`@outbox.event_type`), their registry and the documents and
formats built from it (AsyncAPI, Schema Registry)."""
