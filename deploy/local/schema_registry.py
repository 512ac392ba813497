"""A Confluent-compatible Schema Registry on loopback for the tests that need one: Apicurio
Registry with in-memory storage, built once from Maven Central (deploy/schema-registry/pom.xml)
into the cache, started by the tests that use it and stopped after them. Not part of the stack.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from deploy.local._common import ServiceError, cache_dir, free_port, wait_until
from deploy.local.kafka import _java_binary, _locked

# Keep in step with <apicurio.version> in deploy/schema-registry/pom.xml.
VERSION = "2.4.2.Final"
PROJECT = Path(__file__).resolve().parents[1] / "schema-registry"
JAR = "local-schema-registry-0-runner.jar"
# The Confluent-compatible API that confluent-kafka's SchemaRegistryClient speaks.
CCOMPAT_PATH = "/apis/ccompat/v7"
START_TIMEOUT = 120.0
BUILD_TIMEOUT = 1500.0
JVM_OPTIONS = ["-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:+ExitOnOutOfMemoryError",
               "-Djava.awt.headless=true"]
NAME = "schema-registry"


def build() -> Path:
    """The registry's runnable jar, built once with Maven into the cache (minutes, the first
    time: a Quarkus build of Apicurio's application module)."""
    target = cache_dir() / f"apicurio-registry-{VERSION}"
    jar = target / JAR
    if jar.exists():
        return jar
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError(NAME, "Maven (`mvn`) is needed once to build the registry")
    with _locked(target.with_name(target.name + ".lock")):
        if jar.exists():  # another process built it while we waited
            return jar
        work = target.with_name(target.name + ".build")
        shutil.rmtree(work, ignore_errors=True)
        # Built in a copy: the repository stays free of target/ directories.
        shutil.copytree(PROJECT, work)
        print(f"{NAME}: building Apicurio Registry {VERSION} with Maven", file=sys.stderr)
        # On the command line: the registry's own application.properties asks for a legacy-jar.
        result = subprocess.run([mvn, "-B", "-q", "-Dstyle.color=never",
                                 "-Dquarkus.package.type=uber-jar", "package"], cwd=work,
                                capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        built = work / "target" / JAR
        if result.returncode != 0 or not built.exists():
            output = (result.stdout + result.stderr).strip().splitlines()
            raise ServiceError(NAME, "mvn could not build the registry:\n" + "\n".join(
                output[-30:]))
        target.mkdir(parents=True, exist_ok=True)
        built.replace(jar)
        shutil.rmtree(work, ignore_errors=True)
    return jar


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class SchemaRegistryProcess:
    """One registry process with its own port and log; `url` is its Confluent-compatible API."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.log = home / "schema-registry.log"
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        jar = build()
        port = free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [_java_binary(), *JVM_OPTIONS, f"-Dquarkus.http.port={port}",
               "-Dquarkus.http.host=127.0.0.1", "-jar", str(jar)]
        with self.log.open("ab") as out:
            self._process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, cwd=self.home)
        self.url = f"http://127.0.0.1:{port}{CCOMPAT_PATH}"
        process = self._process
        try:
            wait_until(lambda: _answers(self.url), timeout=START_TIMEOUT, service=NAME,
                       what=f"an answer on {self.url}", log=self.log,
                       alive=lambda: process.poll() is None)
        except ServiceError:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
