"""The local stack: PostgreSQL, Apache Kafka and a MongoDB server on loopback, no Docker needed."""
