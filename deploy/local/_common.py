"""Plumbing shared by the local-stack services: ports, state files, processes, waiting."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path


class ServiceError(RuntimeError):
    """A local-stack service failed to start or stop; the message names it and shows its log."""

    def __init__(self, service: str, message: str, log: Path | None = None) -> None:
        text = f"{service}: {message}"
        if log is not None:
            text += f"\n--- last lines of {log} ---\n{tail(log)}"
        super().__init__(text)
        self.service = service


def tail(path: Path, lines: int = 30) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(content[-lines:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    service: str,
    what: str,
    log: Path | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll `condition` until it holds; fail with the log when time runs out or the service died."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if condition():
            return
        if alive is not None and not alive():
            raise ServiceError(service, f"exited before {what}", log)
        if time.monotonic() > deadline:
            raise ServiceError(service, f"timed out after {timeout:.0f}s waiting for {what}", log)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def stop_pid(pid: int | None, *, timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
    """Send `sig` and wait for the process to go; SIGKILL it if it outlives `timeout`."""
    if not pid_alive(pid):
        return
    assert pid is not None
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
        _reap(pid)
        time.sleep(0.1)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


class StateFile:
    """A small JSON file that remembers a service's pid and ports between commands."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, **values: object) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.read()
        data.update(values)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.path)


def cache_dir() -> Path:
    """Where downloaded artefacts (Kafka jars) live: outside the repository, kept between runs."""
    base = os.environ.get("OUTBOX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "outbox-relay"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path
