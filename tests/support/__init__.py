"""Helpers shared by the test suites: service discovery, Kafka reading, the ledger check."""
