"""The relay under test as its own process (`outbox relay ...`): its CPU and memory are its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from bench.env import REPO
from bench.procstat import Memory, cpu_seconds, memory
from relay.verify.relayproc import stop_process, tail


class RelayProcess:
    """Started with `start`, measured through /proc while it runs, stopped with SIGTERM."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = [sys.executable, "-m", "relay.cli", "relay", *args]
        # Connection strings travel in the environment, not in argv (visible in `ps`).
        self.env = {**os.environ, "OUTBOX_LOG_FORMAT": "json", **env}
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None
        self.started_wall = 0.0
        self.started = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None, "relay not started"
        return self.process.pid

    def start(self) -> RelayProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.started_wall = time.time()
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                self.args, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid)

    def memory(self) -> Memory | None:
        return memory(self.pid)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the relay's clean stop), then SIGKILL after `timeout`; the exit code."""
        if self.process is None:
            return None
        return stop_process(self.process, timeout)

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.log_path, lines)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
