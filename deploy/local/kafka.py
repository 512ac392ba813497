"""Apache Kafka for the local stack: a single KRaft broker from Maven Central jars, on loopback."""

from __future__ import annotations

import base64
import fcntl
import importlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy.local._common import (
    ServiceError,
    StateFile,
    cache_dir,
    free_port,
    pid_alive,
    port_open,
    stop_pid,
    wait_until,
)

# Keep in step with <kafka.version> in deploy/kafka/pom.xml (passed to mvn explicitly anyway).
VERSION = "4.3.1"
POM = Path(__file__).resolve().parents[1] / "kafka" / "pom.xml"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
NODE_ID = 1
START_TIMEOUT = 90.0
# The machine is shared with PostgreSQL, MongoDB and the tests: a small fixed heap, and the serial
# collector, which has the least overhead on 2 cores with a heap this size.
JVM_OPTIONS = [
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    # A broker that ran out of memory is better dead (status says so) than half-alive.
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]
LOG4J2 = """\
# written by deploy/local/kafka.py; stdout goes to kafka.log
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
# Every client and server config object dumps all its values at INFO: hundreds of lines that
# bury the interesting ones; server.properties next to the log says what was set.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


class KafkaService:
    name = "kafka"

    def __init__(self, root: Path) -> None:
        self.home = root.resolve() / "kafka"
        self.data = self.home / "data"
        self.config = self.home / "server.properties"
        self.log4j = self.home / "log4j2.properties"
        self.log = self.home / "kafka.log"
        self.state = StateFile(self.home / "state.json")

    # -- public interface ----------------------------------------------------------------------

    def start(self) -> dict[str, str]:
        with _locked(self.home / "lock"):
            pid = self._running_pid()
            if pid is not None:
                # Ours, maybe still starting (another command launched it): make sure it answers.
                self.state.write(pid=pid, **self._ports_in_config())
                self._wait_ready(pid)
                return self._settings()
            jars = fetch_jars()
            broker_port, controller_port = self._ports()
            cluster_id = self._cluster_id()
            self.state.write(
                broker_port=broker_port,
                controller_port=controller_port,
                cluster_id=cluster_id,
                version=VERSION,
                pid=None,
            )
            self._write_config(broker_port, controller_port)
            if not (self.data / "meta.properties").exists():
                self._format(jars, cluster_id)
            pid = self._spawn(jars)
            self.state.write(pid=pid)
            try:
                self._wait_ready(pid)
            except ServiceError:
                # Leave nothing half-started behind: the next start() begins from scratch.
                stop_pid(pid, timeout=10)
                self.state.write(pid=None)
                raise
            return self._settings()

    def stop(self) -> None:
        if not self.home.exists():
            return
        with _locked(self.home / "lock"):
            pids = set(self._orphan_pids())
            recorded = self._recorded_pid()
            if recorded is not None and self._is_ours(recorded):
                pids.add(recorded)
            for pid in pids:
                # A clean shutdown takes about 2 s; 30 s covers a loaded machine before SIGKILL.
                stop_pid(pid, timeout=30)
            if self.state.path.exists():
                self.state.write(pid=None)

    def status(self) -> str | None:
        pid = self._running_pid()
        if pid is None:
            return None
        state = self.state.read()
        version = state.get("version", VERSION)
        port = state.get("broker_port") or self._ports_in_config().get("broker_port")
        answering = "" if isinstance(port, int) and port_open(port) else ", not answering yet"
        return f"Apache Kafka {version} (KRaft) on 127.0.0.1:{port}, pid {pid}{answering}"

    # -- internals -----------------------------------------------------------------------------

    def _settings(self) -> dict[str, str]:
        return {"OUTBOX_KAFKA_BOOTSTRAP": f"127.0.0.1:{self.state.read()['broker_port']}"}

    def _cluster_id(self) -> str:
        """The id the data directory was formatted with, else the remembered or a new one."""
        try:
            for line in (self.data / "meta.properties").read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "cluster.id" and value.strip():
                    return value.strip()
        except OSError:
            pass
        return str(self.state.read().get("cluster_id") or _new_cluster_id())

    def _recorded_pid(self) -> int | None:
        pid = self.state.read().get("pid")
        return pid if isinstance(pid, int) else None

    def _is_ours(self, pid: int) -> bool:
        """Whether `pid` is a live broker run on this root's config (not a recycled pid)."""
        if not pid_alive(pid):
            return False
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return MAIN_CLASS.encode() in argv and str(self.config).encode() in argv

    def _orphan_pids(self) -> list[int]:
        """Brokers on this root's config that the state file lost track of (e.g. it was deleted)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._is_ours(int(entry.name)):
                found.append(int(entry.name))
        return found

    def _running_pid(self) -> int | None:
        recorded = self._recorded_pid()
        if recorded is not None and self._is_ours(recorded):
            return recorded
        orphans = self._orphan_pids()
        return orphans[0] if orphans else None

    def _ports_in_config(self) -> dict[str, int]:
        """The ports a running broker was started with, should the state file have lost them."""
        try:
            lines = self.config.read_text().splitlines()
        except OSError:
            return {}
        keys = {"PLAINTEXT": "broker_port", "CONTROLLER": "controller_port"}
        found: dict[str, int] = {}
        for line in lines:
            key, _, value = line.partition("=")
            if key != "listeners":
                continue
            for listener in value.split(","):  # e.g. PLAINTEXT://127.0.0.1:29092
                name, _, port = listener.partition("://")
                port = port.rpartition(":")[2]
                if name in keys and port.isdigit():
                    found[keys[name]] = int(port)
        return found

    def _ports(self) -> tuple[int, int]:
        """The remembered ports, so clients reconnect to the same address after a restart."""
        state = self.state.read()
        ports: list[int] = []
        for key in ("broker_port", "controller_port"):
            port = state.get(key)
            if isinstance(port, int) and port not in ports and _bindable(port):
                ports.append(port)
                continue
            if isinstance(port, int):
                print(
                    f"kafka: port {port} is taken by another program; using a new one",
                    file=sys.stderr,
                )
            ports.append(_stable_port(set(ports)))
        return ports[0], ports[1]

    def _write_config(self, broker_port: int, controller_port: int) -> None:
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            # A static single-voter quorum: formatting needs no --standalone, and a changed
            # controller port (only when the old one was taken) needs no reconfiguration.
            "controller.quorum.voters": f"{NODE_ID}@127.0.0.1:{controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker_port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data),
            "num.partitions": "1",
            # Demo convenience; the tests create their topics explicitly.
            "auto.create.topics.enable": "true",
            # Matches the relay producer's limit, so an event the writer accepts (1 MiB
            # payload) is accepted by the broker too.
            "message.max.bytes": "1200000",
            # One broker: every internal topic must make do with one replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "min.insync.replicas": "1",
            # The defaults (50 partitions each) make the first consumer group or transaction
            # wait while a single broker creates 50 partitions; one is plenty locally.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            # Tests start consumers and expect assignments at once, not after 3 s.
            "group.initial.rebalance.delay.ms": "0",
        }
        self.home.mkdir(parents=True, exist_ok=True)
        body = "".join(f"{key}={value}\n" for key, value in settings.items())
        self.config.write_text("# written by deploy/local/kafka.py on every start\n" + body)
        self.log4j.write_text(LOG4J2)

    def _java(self, jars: Path, main: str, *args: str) -> list[str]:
        return [
            _java_binary(),
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={self.log4j}",
            # Crash reports next to the log, not in whatever directory start() was called from.
            f"-XX:ErrorFile={self.home}/hs_err_pid%p.log",
            "-cp",
            f"{jars}/*",
            main,
            *args,
        ]

    def _format(self, jars: Path, cluster_id: str) -> None:
        # A data directory without meta.properties is a format that did not finish: redo it.
        if self.data.exists():
            shutil.rmtree(self.data)
        cmd = self._java(jars, STORAGE_TOOL, "format", "-t", cluster_id, "-c", str(self.config))
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.home)
        if result.returncode != 0 or not (self.data / "meta.properties").exists():
            output = (result.stdout + result.stderr).strip().splitlines()
            raise ServiceError(
                self.name, "formatting the storage failed:\n" + "\n".join(output[-30:])
            )

    def _spawn(self, jars: Path) -> int:
        if self.log.exists():
            self.log.replace(self.log.with_name(self.log.name + ".1"))
        cmd = self._java(jars, MAIN_CLASS, str(self.config))
        # posix_spawn rather than subprocess.Popen: the broker outlives this process, and a
        # Popen object dropped while its child runs raises a ResourceWarning, which the test
        # suite turns into an error. setsid detaches it from our terminal and process group.
        with self.log.open("ab") as out:
            return os.posix_spawn(
                cmd[0],
                cmd,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                    (os.POSIX_SPAWN_DUP2, out.fileno(), 2),
                ],
                setsid=True,
                # Python ignores SIGPIPE and may block signals; the JVM should start as usual.
                setsigdef=(signal.SIGPIPE, signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
                setsigmask=(),
            )

    def _wait_ready(self, pid: int) -> None:
        port = int(str(self.state.read()["broker_port"]))
        wait_until(
            lambda: port_open(port) and _answers_metadata(port),
            timeout=START_TIMEOUT,
            service=self.name,
            what=f"a metadata answer on 127.0.0.1:{port}",
            log=self.log,
            alive=lambda: pid_alive(pid),
        )


def fetch_jars() -> Path:
    """The broker's jars, downloaded once with Maven into the cache outside the repository."""
    target = cache_dir() / f"kafka-{VERSION}"
    marker = target / ".complete"
    if marker.exists():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("kafka", "Maven (`mvn`) is needed once to download the Kafka jars")
    with _locked(target.with_name(target.name + ".lock")):
        if marker.exists():  # another process finished the download while we waited
            return target
        partial = target.with_name(target.name + ".partial")
        for leftover in (partial, target):
            shutil.rmtree(leftover, ignore_errors=True)
        print(f"kafka: downloading Apache Kafka {VERSION} jars with Maven", file=sys.stderr)
        cmd = [
            mvn,
            "-B",
            "-q",
            "-Dstyle.color=never",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={partial}",
            f"-Dkafka.version={VERSION}",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if result.returncode != 0 or not (partial / f"kafka_2.13-{VERSION}.jar").exists():
            output = (result.stdout + result.stderr).strip().splitlines()
            raise ServiceError("kafka", "mvn could not fetch the jars:\n" + "\n".join(output[-30:]))
        # The marker goes in before the rename, so `target` only ever appears complete.
        (partial / ".complete").write_text(VERSION + "\n")
        partial.replace(target)
    return target


def _java_binary() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise ServiceError("kafka", "no `java` found (Kafka 4 needs Java 17 or newer)")
    return found


def _answers_metadata(port: int) -> bool:
    """Whether the broker serves a metadata request listing itself: listening is not yet ready."""
    try:
        admin = importlib.import_module("confluent_kafka.admin")
    except ImportError:
        return True  # no client library here: the open port is the best we can check
    # librdkafka logs every refused attempt; while we poll that is noise, not news.
    quiet = logging.getLogger(f"{__name__}.probe")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    client = admin.AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "logger": quiet})
    try:
        metadata = client.list_topics(timeout=3)
    except Exception:  # KafkaException while the broker is still joining its own quorum
        return False
    return bool(NODE_ID in metadata.brokers)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the JVM does: TIME_WAIT connections of our own previous run must not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stable_port(taken: set[int]) -> int:
    """A free port below the kernel's ephemeral range.

    While the broker is down, clients keep reconnecting to its address; a port inside the
    ephemeral range can meanwhile be handed to one of those outgoing sockets (even a TCP
    self-connect), and the restarted broker could not bind it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low > 20000:
        for _ in range(100):
            port = random.randrange(20000, low)
            if port not in taken and _bindable(port):
                return port
    while True:
        port = free_port()
        if port not in taken:
            return port


def _new_cluster_id() -> str:
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding. Like Kafka, skip
    # ids that begin with "-": the format command would take one for an option.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise start/stop (and downloads) across processes, e.g. parallel test workers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
