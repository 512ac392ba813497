"""Running a relay for a test: in a thread (most tests) or as a real process (kill -9 tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from relay import main as relay_main
from relay.settings import RelaySettings

REPO = Path(__file__).resolve().parents[2]


class RelayThread:
    """The relay daemon's `run` on a thread, stopped through its stop event."""

    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def _run(self) -> None:
        try:
            relay_main.run(self.settings, self.stop_event)
        except BaseException as exc:
            self.error = exc

    def start(self) -> RelayThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "relay did not stop in time"
        if self.error is not None:
            raise self.error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> RelayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RelayProcess:
    """`outbox relay ...` as a child process, for signals and kill -9."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path) -> None:
        self.args = [sys.executable, "-m", "relay.cli", "relay", *args]
        self.env = {**os.environ, "OUTBOX_LOG_FORMAT": "json", **(env or {})}
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds (with a short, growing pause); fail naming `what`."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)
