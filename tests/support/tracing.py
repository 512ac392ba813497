"""OpenTelemetry's SDK with an in-memory exporter, for tests of trace propagation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_exporter: InMemorySpanExporter | None = None


def _session_exporter() -> InMemorySpanExporter:
    """One exporter on the process's tracer provider (which can be set only once: an SDK
    provider set by someone else gets the exporter added)."""
    global _exporter
    if _exporter is None:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            trace.set_tracer_provider(TracerProvider())
            provider = trace.get_tracer_provider()
        assert isinstance(provider, TracerProvider), "another provider than the SDK's is set"
        _exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
    return _exporter


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans finished during the test (the exporter is cleared before and after)."""
    exporter = _session_exporter()
    exporter.clear()
    yield exporter
    exporter.clear()
