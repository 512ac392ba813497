"""Prometheus metrics of a consumer, read from its counters (`ConsumerStats`) when scraped.

    from prometheus_client import REGISTRY, start_http_server
    REGISTRY.register(ConsumerCollector(consumer))
    start_http_server(9109)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from outbox.consumer.base import ConsumerBase

# ConsumerStats field -> (metric name without _total, help).
_COUNTERS = {
    "processed": ("outbox_consumer_processed", "Messages applied (handler and inbox committed)."),
    "duplicates": ("outbox_consumer_duplicates", "Messages skipped as already applied."),
    "dead_lettered": ("outbox_consumer_dead_lettered", "Messages Kafka acknowledged in the DLQ."),
    "retries": ("outbox_consumer_retries", "Handler retries."),
    "sequence_gaps": ("outbox_consumer_sequence_gaps",
                      "Messages dead-lettered because an earlier number of their aggregate "
                      "never arrived within gap_timeout (ordering='sequence')."),
}


class ConsumerCollector(Collector):
    """The counters of one `Consumer` or `AsyncConsumer`, labelled with its name."""

    def __init__(self, consumer: ConsumerBase[Any]) -> None:
        self.consumer = consumer

    def collect(self) -> Iterator[Metric]:
        stats = self.consumer.stats
        name = self.consumer.config.name
        for field, (metric, help_text) in _COUNTERS.items():
            family = CounterMetricFamily(metric, help_text, labels=["consumer"])
            family.add_metric([name], getattr(stats, field))
            yield family
