"""The supervisor's restart policy, with fake relays and a fake clock (no real waiting)."""

from __future__ import annotations

import threading

from relay.daemon import supervise
from relay.errors import SourceUnavailableError


class RecordingStop(threading.Event):
    """A stop event whose waits are recorded and return at once."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(float(timeout or 0))
        return self.is_set()


def test_backoff_doubles_in_a_crash_loop_and_resets_after_a_healthy_run() -> None:
    now = [0.0]
    # How long each relay runs before it fails; the last one returns (a clean stop).
    runs = iter([1.0, 1.0, 1.0, 120.0, 1.0, None])

    class FakeRelay:
        def run(self, stop: threading.Event) -> None:
            seconds = next(runs)
            if seconds is None:
                return
            now[0] += seconds
            raise SourceUnavailableError("lost PostgreSQL")

    stop = RecordingStop()
    supervise(FakeRelay, stop, initial_backoff=0.5, max_backoff=30.0, healthy_after=60.0,
              clock=lambda: now[0])
    assert stop.waits == [0.5, 1.0, 2.0, 0.5, 1.0]
