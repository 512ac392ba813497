"""Progress of long phases on stderr (relay.verify.progress, shared with `outbox verify`)."""

from __future__ import annotations

from relay.verify.progress import Progress, bar

__all__ = ["Progress", "bar"]
