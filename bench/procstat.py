"""CPU seconds and memory of processes, read from /proc (no psutil), and CPU accounting."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float | None:
    """User + system CPU seconds of `pid` (all its threads); with `reaped_children`, also of
    children it has waited for (a postmaster reaps its backends, so exited ones still count)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def tree_cpu_seconds(root: int) -> float | None:
    """CPU seconds of a server and its direct children (PostgreSQL's process model)."""
    total = cpu_seconds(root, reaped_children=True)
    if total is None:
        return None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_of(int(entry.name)) == root:
            total += cpu_seconds(int(entry.name)) or 0.0
    return total


@dataclass(frozen=True)
class Memory:
    rss_kb: int
    peak_rss_kb: int  # VmHWM: the high-water mark of the resident set


def memory(pid: int) -> Memory | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    if len(values) < 2:
        return None
    return Memory(rss_kb=values["VmRSS"], peak_rss_kb=values["VmHWM"])


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all CPUs."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
    total = sum(parts[:8])  # guest time is already inside user/nice
    return (total - idle) / _TICKS, total / _TICKS


@dataclass(frozen=True)
class CpuSnapshot:
    at: float
    machine_busy: float
    machine_total: float
    components: dict[str, float]


@dataclass
class CpuAccounting:
    """Who used the CPU during a phase: the relay, PostgreSQL, Kafka, the suite, the rest.

    The machine is shared (2 cores for everything, other engineers' test runs too), so a figure
    means little without knowing what else was running; "other" is what none of ours used.
    """

    pids: dict[str, int] = field(default_factory=dict)
    trees: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> CpuSnapshot:
        busy, total = machine_cpu()
        components: dict[str, float] = {}
        for name, pid in self.pids.items():
            value = cpu_seconds(pid)
            if value is not None:
                components[name] = value
        for name, pid in self.trees.items():
            value = tree_cpu_seconds(pid)
            if value is not None:
                components[name] = value
        # The suite and the processes it has reaped (its backlog writers).
        own = os.times()
        components["bench"] = own.user + own.system + own.children_user + own.children_system
        return CpuSnapshot(time.monotonic(), busy, total, components)

    @staticmethod
    def between(start: CpuSnapshot, end: CpuSnapshot) -> dict[str, float]:
        """CPU seconds per component and for the machine between two snapshots."""
        wall = end.at - start.at
        used = {
            name: round(end.components[name] - start.components[name], 2)
            for name in end.components
            if name in start.components
        }
        busy = end.machine_busy - start.machine_busy
        capacity = end.machine_total - start.machine_total
        used["other"] = round(max(0.0, busy - sum(used.values())), 2)
        used["machine_busy"] = round(busy, 2)
        used["wall_s"] = round(wall, 2)
        used["machine_busy_fraction"] = round(busy / capacity, 3) if capacity > 0 else 0.0
        return used
