"""The operator console: one HTML page on the relay's metrics port (docs/operations.md)."""
