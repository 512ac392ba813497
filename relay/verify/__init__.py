"""`outbox verify`: prove the relay's guarantees on the user's own database, role and broker.

A scratch outbox and topic, writers with a ledger, the relay as a child process under faults,
and a verdict read back from Kafka (docs/operations.md, "Verifying a setup").
"""
