"""Deployment helpers: the local stack used by tests and the demo."""
