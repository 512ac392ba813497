"""The relay daemon: reads committed outbox events from a source and publishes them to Kafka."""
