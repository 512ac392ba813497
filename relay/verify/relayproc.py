"""The relay under test as a child process (`python -m relay.cli relay`, the installed package's
own entry point) on the scratch outbox, and the faults done to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg

from outbox.conninfo import libpq_url
from relay.verify.plan import KafkaAccess, ScratchNames


def relay_environment(
    source: str, url: str, kafka: KafkaAccess, names: ScratchNames
) -> dict[str, str]:
    """The child's environment: the caller's, without any OUTBOX_* setting (those are for the
    application's relay: another table, a metrics port, a config file), plus the scratch
    outbox's. Connection strings travel here, not in argv (visible in `ps`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update({
        "OUTBOX_SOURCE": source,
        "OUTBOX_LOG_FORMAT": "json",
        "OUTBOX_SHUTDOWN_TIMEOUT": "15",
        **kafka.environment(),
    })
    if source.startswith("mongo-"):
        from relay.verify.mongo import COLLECTION, scratch_url

        env.update({"OUTBOX_MONGO_URL": scratch_url(url, names.table),
                    "OUTBOX_COLLECTIONS": COLLECTION})
        return env
    env.update({
        # The relay's sessions carry a name of their own: connection-drop finds them by it.
        "OUTBOX_DB_URL": psycopg.conninfo.make_conninfo(
            libpq_url(url), application_name=names.application_name),
        "OUTBOX_SCHEMA": names.schema,
        "OUTBOX_TABLE": names.table,
    })
    if source == "postgres-wal":
        env.update({"OUTBOX_SLOT": names.slot, "OUTBOX_PUBLICATION": names.publication})
    return env


class ChildRelay:
    """Started, killed, stopped and continued; the log of every incarnation in one file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.args = [sys.executable, "-m", "relay.cli", "relay"]
        self.env = env
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[int] = []  # exit codes of incarnations that ended on their own

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            # A session of its own: the terminal's Ctrl-C reaches verify alone, which then
            # stops the relay itself, in order.
            self.process = subprocess.Popen(
                self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited(self) -> int | None:
        """The exit code if the relay ended on its own (not by a fault), once; else None."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        self.exits.append(code)
        self.process = None
        return code

    def kill(self) -> None:
        """relay-kill: SIGKILL, as the OOM killer or a lost node would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.process = None

    def pause(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        process, self.process = self.process, None
        return stop_process(process, timeout)

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.log_path, lines)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM (the relay's clean stop, after SIGCONT should it be stopped), SIGKILL after
    `timeout`; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(30)


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file ("" if there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])

