"""The Kafka sink: `sink.py` (send, delivery reports, which errors are permanent), `settings.py`
(producer defaults and refused settings), `topic_limits.py` (each topic's own size limit)."""
