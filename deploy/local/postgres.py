"""PostgreSQL for the local stack: a wal_level=logical cluster run by an unprivileged user."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from deploy.local._common import (
    ServiceError,
    StateFile,
    free_port,
    pid_alive,
    port_open,
    wait_until,
)

DATABASE = "outbox"
SUPERUSER = "outbox"
# Several relays, standbys and tests each hold a slot and a WAL sender at once.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "wal_level": "logical",
    "max_replication_slots": "64",
    "max_wal_senders": "64",
    "max_connections": "300",
    "shared_buffers": "256MB",
    "max_wal_size": "2GB",
    "wal_sender_timeout": "60s",
    "logging_collector": "off",
}


def find_bindir() -> Path:
    """The directory holding initdb/pg_ctl/postgres: PATH, Debian's package, apt, then pgserver."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    candidates += [Path(p) for p in debian]
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    if os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install_postgresql()
        return find_bindir_after_install()
    try:
        import pgserver  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise ServiceError(
            "postgres",
            "no PostgreSQL server binaries found: install Debian's `postgresql` package "
            "or `pip install pgserver`",
        ) from exc
    bindir = Path(pgserver.__file__).parent / "pginstall" / "bin"
    if not (bindir / "initdb").exists():
        raise ServiceError("postgres", f"pgserver is installed but has no initdb under {bindir}")
    return bindir


def find_bindir_after_install() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise ServiceError("postgres", "apt-get installed postgresql but no initdb was found")
    return Path(found[-1]).parent


def _apt_install_postgresql() -> None:
    print("postgres: installing Debian's postgresql package", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceError("postgres", f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")


def server_user() -> str | None:
    """The unprivileged account that owns the cluster when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "outbox"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "outbox"],
        check=True,
    )
    return "outbox"


def traversable_by_others(path: Path) -> bool:
    """Whether an unprivileged user can reach `path` (every parent directory has o+x)."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return False
    return True


def server_home(wanted: Path, user: str | None) -> Path:
    """Where the cluster lives: under .local/ when the server's user can reach it; otherwise
    (a checkout under /root, a pytest tmp dir) in /var/tmp, one directory per checkout."""
    if user is None or traversable_by_others(wanted.parent):
        return wanted
    digest = hashlib.sha1(str(wanted).encode()).hexdigest()[:12]
    home = Path("/var/tmp/outbox-relay") / f"postgres-{digest}"
    home.parent.mkdir(parents=True, exist_ok=True)
    home.parent.chmod(0o755)
    return home


class PostgresService:
    name = "postgres"

    def __init__(self, root: Path) -> None:
        self.state = StateFile(root.resolve() / "postgres" / "state.json")
        self.home = server_home(root.resolve() / "postgres", server_user())
        self.data = self.home / "data"
        self.log = self.home / "postgres.log"

    # -- public interface ----------------------------------------------------------------------

    def start(self) -> dict[str, str]:
        state = self.state.read()
        if self._running():
            return self._settings()
        bindir = find_bindir()
        user = server_user()
        stored = state.get("port")
        port = stored if isinstance(stored, int) else 0
        if not port or port_open(port):
            port = free_port()
        password = str(state.get("password") or secrets.token_urlsafe(18))
        self.state.write(port=port, password=password, bindir=str(bindir))
        if not (self.data / "PG_VERSION").exists():
            self._initdb(bindir, user, password)
        self._configure(port)
        self._pg_ctl(bindir, user, "start", "-w", "-t", "60", "-l", str(self.log))
        wait_until(
            lambda: port_open(port), timeout=30, service=self.name, what="port", log=self.log
        )
        self._create_database(bindir, user, port, password)
        return self._settings()

    def stop(self) -> None:
        state = self.state.read()
        if not (self.data / "postmaster.pid").exists():
            return
        bindir = Path(str(state.get("bindir") or find_bindir()))
        self._pg_ctl(bindir, server_user(), "stop", "-m", "fast", "-w", "-t", "60", check=False)

    def discard(self) -> None:
        """Stop the server and delete its cluster: for a throw-away server (a test's own),
        whose home may be in /var/tmp, where nothing else would ever remove it."""
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def status(self) -> str | None:
        if not self._running():
            return None
        state = self.state.read()
        version = (self.data / "PG_VERSION").read_text().strip()
        port, pid = state["port"], self._pid()
        return f"PostgreSQL {version} on 127.0.0.1:{port}, pid {pid}, data {self.data}"

    # -- internals -----------------------------------------------------------------------------

    def _settings(self) -> dict[str, str]:
        state = self.state.read()
        url = f"postgresql://{SUPERUSER}:{state['password']}@127.0.0.1:{state['port']}/{DATABASE}"
        return {"OUTBOX_DB_URL": url}

    def _pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _running(self) -> bool:
        port = self.state.read().get("port")
        return pid_alive(self._pid()) and isinstance(port, int) and port_open(port)

    def _run_as(self, user: str | None, cmd: list[str], check: bool = True) -> None:
        result = subprocess.run(cmd, user=user, capture_output=True, text=True, cwd="/")
        if check and result.returncode != 0:
            raise ServiceError(
                self.name, f"{Path(cmd[0]).name} failed: {result.stderr.strip()}", self.log
            )

    def _initdb(self, bindir: Path, user: str | None, password: str) -> None:
        if self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(parents=True)
        self.home.chmod(0o755)
        pwfile = self.home / "pwfile"
        pwfile.write_text(password + "\n")
        if user:
            account = pwd.getpwnam(user)
            for path in (self.home, self.data, pwfile):
                os.chown(path, account.pw_uid, account.pw_gid)
        self.data.chmod(0o700)
        self._run_as(
            user,
            [
                str(bindir / "initdb"),
                "-D", str(self.data),
                "-U", SUPERUSER,
                "--pwfile", str(pwfile),
                "--auth-local", "trust",
                "--auth-host", "scram-sha-256",
                "--encoding", "UTF8",
                "--no-instructions",
            ],
        )
        pwfile.unlink()

    def _configure(self, port: int) -> None:
        lines = [f"{key} = {value}" for key, value in SETTINGS.items()]
        lines += [f"port = {port}", f"unix_socket_directories = '{self.home}'"]
        conf = self.data / "postgresql.auto.conf"
        conf.write_text("# written by deploy/local/postgres.py\n" + "\n".join(lines) + "\n")
        user = server_user()
        if user:
            account = pwd.getpwnam(user)
            os.chown(conf, account.pw_uid, account.pw_gid)

    def _pg_ctl(self, bindir: Path, user: str | None, *args: str, check: bool = True) -> None:
        self._run_as(user, [str(bindir / "pg_ctl"), "-D", str(self.data), *args], check=check)

    def _create_database(self, bindir: Path, user: str | None, port: int, password: str) -> None:
        # psql variables (:'name' literal, :"name" identifier) quote the database name for us.
        script = (
            "SELECT format('CREATE DATABASE %I', :'dbname')"
            " WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'dbname') \\gexec\n"
        )
        result = subprocess.run(
            [
                str(bindir / "psql"), "-h", str(self.home), "-p", str(port), "-U", SUPERUSER,
                "-d", "postgres", "-v", f"dbname={DATABASE}", "-v", "ON_ERROR_STOP=1", "-q",
            ],
            input=script, user=user, capture_output=True, text=True, cwd="/",
        )
        if result.returncode != 0:
            raise ServiceError(self.name, f"creating database failed: {result.stderr.strip()}")
