"""MongoDB for the local stack: a single-node replica set (mongod, or SecantusDB when absent)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.local._common import (
    ServiceError,
    StateFile,
    free_port,
    pid_alive,
    port_open,
    stop_pid,
    wait_until,
)

if TYPE_CHECKING:
    from pymongo import MongoClient

DATABASE = "outbox"
MONGOD_SET_NAME = "rs0"
START_TIMEOUT = 60.0
# The local stack shares a small machine with PostgreSQL and Kafka; WiredTiger would otherwise
# size its cache to half the RAM.
CACHE_GB = 0.5
# mongod writes a no-op to the oplog every 10 s on a replica set, which keeps an idle change
# stream's resume token fresh; SecantusDB does so only when asked.
NOOP_HEARTBEAT_SECONDS = 10
# SecantusDB prunes its oplog after 1 h / 100k entries by default; mongod keeps a size-capped
# oplog that lasts days on a dev machine. A relay stopped overnight must still resume, so keep a
# week.
OPLOG_RETENTION_SECONDS = 7 * 24 * 3600
OPLOG_MAX_ENTRIES = 2_000_000


class MongoService:
    name = "mongo"

    def __init__(self, root: Path) -> None:
        self.home = root.resolve() / "mongo"
        self.state = StateFile(self.home / "state.json")

    # -- public interface ----------------------------------------------------------------------

    def start(self) -> dict[str, str]:
        state = self.state.read()
        pid = _int(state.get("pid"))
        if self._ours(pid, state):
            # Already running, or still starting from another command: answer once it is ready.
            assert pid is not None
            engine = str(state.get("engine"))
            self._become_ready(engine, pid, _int(state.get("port")), self._log(engine))
            return self._settings()
        engine = "mongod" if shutil.which("mongod") else "secantus"
        port = self._choose_port(engine, state)
        data = self._data(engine)
        data.mkdir(parents=True, exist_ok=True)
        log = self._log(engine)
        cmd = self._mongod_cmd(port, data) if engine == "mongod" else self._secantus_cmd(port, data)
        pid = _spawn(cmd, log)
        self.state.write(engine=engine, pid=pid, port=port, data=str(data), log=str(log))
        try:
            self._become_ready(engine, pid, port, log)
        except BaseException:
            # A half-started server would hold the data directory's lock and the port.
            stop_pid(pid)
            self.state.write(pid=None)
            raise
        return self._settings()

    def stop(self) -> None:
        state = self.state.read()
        pid = _int(state.get("pid"))
        if self._ours(pid, state):
            # Both servers take SIGTERM as a clean shutdown (WiredTiger checkpoint); SecantusDB
            # needs a few seconds for it.
            stop_pid(pid, timeout=30.0)
        if pid:
            self.state.write(pid=None)

    def status(self) -> str | None:
        state = self.state.read()
        pid = _int(state.get("pid"))
        port = _int(state.get("port"))
        if port is None or not (self._ours(pid, state) and port_open(port)):
            return None
        engine = "SecantusDB" if state.get("engine") == "secantus" else "mongod"
        return (
            f"{engine} {state.get('version', '?')} (replica set {state.get('set_name', '?')}) "
            f"on 127.0.0.1:{port}, pid {pid}, data {state.get('data')}"
        )

    # -- internals -----------------------------------------------------------------------------

    def _settings(self) -> dict[str, str]:
        state = self.state.read()
        # replicaSet= makes the driver discover the set as it would in production, which is what
        # transactions and change streams require; the set name is the one the server reports.
        url = f"mongodb://127.0.0.1:{state['port']}/{DATABASE}?replicaSet={state['set_name']}"
        return {"OUTBOX_MONGO_URL": url}

    def _data(self, engine: str) -> Path:
        # Separate directories: the two engines' on-disk formats are not interchangeable, and
        # installing mongod later must not make it choke on SecantusDB's files.
        return self.home / ("data" if engine == "mongod" else "secantus-data")

    def _log(self, engine: str) -> Path:
        return self.home / f"{engine}.log"

    def _ours(self, pid: int | None, state: dict[str, object]) -> bool:
        """The recorded pid is alive and is our server, not an unrelated reuse of the number."""
        if not pid_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(state.get("data")).encode() in cmdline

    def _choose_port(self, engine: str, state: dict[str, object]) -> int:
        port = _int(state.get("port"))
        if port and state.get("engine") == engine and not port_open(port):
            return port
        if port and state.get("engine") == engine and engine == "mongod":
            # The replica-set config stored in the data directory names 127.0.0.1:<port>; on any
            # other port the node would not find itself in the set and never become primary.
            raise ServiceError(
                self.name,
                f"port {port}, which the replica set in {self._data(engine)} was initiated "
                f"with, is taken by another process; free it or remove {self.home}",
            )
        return free_port()

    def _mongod_cmd(self, port: int, data: Path) -> list[str]:
        mongod = shutil.which("mongod")
        assert mongod is not None
        return [
            mongod,
            "--replSet", MONGOD_SET_NAME,
            "--bind_ip", "127.0.0.1",
            "--port", str(port),
            "--dbpath", str(data),
            "--wiredTigerCacheSizeGB", str(CACHE_GB),
        ]  # fmt: skip

    def _secantus_cmd(self, port: int, data: Path) -> list[str]:
        if importlib.util.find_spec("secantus") is None:
            raise ServiceError(
                self.name,
                "no `mongod` on PATH and SecantusDB is not installed in this Python "
                f"({sys.executable}): pip install 'outbox-relay[local-mongo]'",
            )
        # An explicit --config turns off SecantusDB's search of ./, ~/.secantus and
        # /etc/secantus, so a stray secantusd.toml cannot change the port, auth or topology.
        config = self.home / "secantusd.toml"
        config.write_text("# written by deploy/local/mongo.py; the command line sets the rest\n")
        return [
            sys.executable, "-m", "secantus",
            "--config", str(config),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--storage-path", str(data),
            "--log-level", "INFO",
            "--cache-size", f"{int(CACHE_GB * 1024)}M",
            "--noop-heartbeat-seconds", str(NOOP_HEARTBEAT_SECONDS),
            "--oplog-retention-seconds", str(OPLOG_RETENTION_SECONDS),
            "--oplog-max-entries", str(OPLOG_MAX_ENTRIES),
            # mongod acknowledges the default write concern (w: majority) only once the write
            # is journaled, so an acknowledged write survives kill -9. SecantusDB journals
            # lazily unless told otherwise and was measured to lose writes acknowledged within
            # ~0.1 s of a SIGKILL, which would fail the fault tests for the wrong reason.
            "--sync-on-commit",
        ]  # fmt: skip

    def _become_ready(self, engine: str, pid: int, port: int | None, log: Path) -> None:
        """Wait for the server to answer, make it a replica-set primary, record what it is."""
        from pymongo.errors import PyMongoError

        if not port:
            raise ServiceError(self.name, "no port recorded in state.json", log)
        known: int = port
        wait_until(
            lambda: _ping(known),
            timeout=START_TIMEOUT,
            service=self.name,
            what=f"a ping on 127.0.0.1:{port}",
            log=log,
            alive=lambda: pid_alive(pid),
        )
        try:
            if engine == "mongod":
                version = self._initiate_mongod(pid, port, log)
                set_name = MONGOD_SET_NAME
            else:
                version = importlib.metadata.version("secantusdb")
                set_name = self._set_name(port, log)
        except PyMongoError as exc:
            raise ServiceError(self.name, f"{type(exc).__name__}: {exc}", log) from exc
        self.state.write(version=version, set_name=set_name)

    def _set_name(self, port: int, log: Path) -> str:
        hello = _command(port, "hello")
        name = hello.get("setName")
        if not isinstance(name, str) or not hello.get("isWritablePrimary"):
            # Without a replica-set primary, pymongo refuses transactions and change streams.
            raise ServiceError(self.name, f"server is not a replica-set primary: {hello}", log)
        return name

    def _initiate_mongod(self, pid: int, port: int, log: Path) -> str:
        from pymongo.errors import OperationFailure, PyMongoError

        try:
            _command(port, "replSetGetStatus")
        except OperationFailure as exc:
            if exc.code != 94:  # NotYetInitialized: a fresh data directory
                raise
            config = {
                "_id": MONGOD_SET_NAME,
                "members": [{"_id": 0, "host": f"127.0.0.1:{port}"}],
            }
            try:
                _command(port, "replSetInitiate", config)
            except OperationFailure as again:
                if again.code != 23:  # AlreadyInitialized: a concurrent `up` got there first
                    raise

        def primary() -> bool:
            try:
                return bool(_command(port, "hello").get("isWritablePrimary"))
            except PyMongoError:  # the node may drop connections while it changes state
                return False

        wait_until(
            primary,
            timeout=START_TIMEOUT,
            service=self.name,
            what="the replica set to elect this node PRIMARY",
            log=log,
            alive=lambda: pid_alive(pid),
        )
        return str(_command(port, "buildInfo").get("version", "?"))


def _spawn(cmd: list[str], log: Path) -> int:
    """Start `cmd` in its own session with stdout and stderr appended to `log`; return its pid.

    posix_spawn rather than subprocess.Popen: a Popen object for a server meant to outlive it
    warns "subprocess N is still running" when collected, which the test suite turns into an
    error.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        # SECANTUS_TEST_FAST_STORAGE would turn off the journal (data lost at restart), and the
        # test suite's warning filters must not make the server itself die on a warning.
        if not key.startswith("SECANTUS_") and key != "PYTHONWARNINGS"
    }
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:
        # setsid: Ctrl-C in the terminal that ran `up` must not reach the server.
        return os.posix_spawn(cmd[0], cmd, env, file_actions=actions, setsid=True)
    except OSError as exc:
        raise ServiceError("mongo", f"cannot start {cmd[0]}: {exc}") from exc


def _client(port: int) -> MongoClient[dict[str, Any]]:
    from pymongo import MongoClient

    # directConnection: before replSetInitiate mongod is no replica-set member yet, and a
    # replicaSet= client would find no server to select.
    return MongoClient(
        f"mongodb://127.0.0.1:{port}/?directConnection=true",
        serverSelectionTimeoutMS=2000,
        connectTimeoutMS=2000,
    )


def _command(port: int, name: str, value: Any = 1) -> dict[str, Any]:
    client = _client(port)
    try:
        return dict(client.admin.command(name, value))
    finally:
        client.close()


def _ping(port: int) -> bool:
    from pymongo.errors import PyMongoError

    if not port_open(port):
        return False
    try:
        _command(port, "ping")
    except PyMongoError:
        return False
    return True


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
