"""The relay's optional compiled hot path (native/, Rust; built in place by `make native`).

`module` is `relay._native` when it is built, else None: its users then run their pure-Python
code, which gives the same results (relay/wal/decoder.py reads Insert rows and table-less
event messages with it, relay/sinks/kafka/sink.py makes Kafka headers with it).
docs/performance.md says what it saves.
"""

from __future__ import annotations

from typing import Any

module: Any
try:
    from relay import _native as module
except ImportError:  # not built: no cargo where the relay was installed
    module = None
