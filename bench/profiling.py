"""Optional py-spy sampling of the relay process during a phase, summarised per function."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    """py-spy next to this interpreter (the dev virtualenv), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """`py-spy record --idle` of one process, as collapsed stacks (`--format raw`).

    Idle samples are kept on purpose: a relay that waits for PostgreSQL or for Kafka shows
    where it waits, which is the answer to "what limits the drain rate".
    """

    def __init__(self, pid: int, out: Path, rate: int = 97) -> None:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out = out
        self.command = [
            binary, "record", "--pid", str(pid), "--format", "raw", "--idle", "--nonblocking",
            "--rate", str(rate), "--output", str(out),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Profiler:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling (SIGINT makes py-spy write its file) and summarise what it saw."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if not self.out.exists():
            return {"error": (err or b"").decode(errors="replace")[-500:]}
        return summarise(self.out)


def _function(frame: str) -> str:
    """`name (path/file.py:123)` -> `name (file.py)`: lines of one function counted together."""
    frame = _LINE.sub(")", frame.strip())
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')')).name})" if where else name


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    """Share of samples per function: where the time is spent (self) and under what (total)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    if not samples:
        return {"samples": 0, "file": str(path)}

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / samples, 1)] for name, n in counter.most_common(top)]

    # The trunk (runpy, the CLI, the supervisor) is under every sample and says nothing.
    branches = Counter({name: n for name, n in total.items() if n < 0.9 * samples})
    return {"samples": samples, "file": str(path), "self_pct": share(own),
            "total_pct": share(branches)}
