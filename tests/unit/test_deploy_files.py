"""The deployment files (Kubernetes, systemd, the image) are valid and agree with the relay."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from relay.cli import app

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
UNIT = REPO / "deploy" / "systemd" / "outbox-relay.service"
ENV_EXAMPLE = REPO / "deploy" / "systemd" / "outbox-relay.env.example"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
METRICS_PORT = 9400


# -- helpers ----------------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for path in sorted(K8S.glob("*.yaml")) for doc in documents(path)
             if doc.get("kind") == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def relay_container() -> dict[str, Any]:
    containers = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def config() -> dict[str, str]:
    return dict(manifest("ConfigMap", "outbox-relay-config")["data"])


def relay_settings() -> set[str]:
    """The OUTBOX_* variables `outbox relay` reads, and their *_FILE forms (secret files)."""
    command = typer.main.get_command(app).commands["relay"]  # type: ignore[attr-defined]
    names = {str(p.envvar) for p in command.params if p.envvar}
    return names | {f"{name}_FILE" for name in names}


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), " ".join(rest.split())))
    return out


def build_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    assert len(starts) == 2, "a build stage and a runtime stage"
    return instructions[starts[0]:starts[1]]


def runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in dockerfile_instructions():
        if name == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(args)))
    return env


# -- Kubernetes -------------------------------------------------------------------------------


def test_every_manifest_parses_and_names_its_kind() -> None:
    paths = sorted(K8S.glob("*.yaml"))
    assert paths
    for path in paths:
        for doc in documents(path):
            if doc.get("kind") == "Kustomization":
                continue
            assert doc.get("apiVersion") and doc.get("kind"), path.name
            assert doc["metadata"]["name"], path.name
    documents(REPO / "deploy" / "docker-compose.yml")


def test_kustomization_lists_files_that_exist_and_not_the_example_secret() -> None:
    resources = documents(K8S / "kustomization.yaml")[0]["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    # Applying the example would overwrite a real Secret with its placeholder.
    assert "secret.yaml" not in resources


def test_probes_hit_the_health_endpoints_on_the_metrics_port() -> None:
    container = relay_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": METRICS_PORT}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    settings = config()
    assert settings["OUTBOX_METRICS_PORT"] == str(METRICS_PORT)
    # The default (127.0.0.1) would be unreachable for the kubelet and Prometheus.
    assert settings["OUTBOX_METRICS_HOST"] == "0.0.0.0"
    service = manifest("Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    endpoints = manifest("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("metrics", "/metrics")]


def test_relay_runs_as_non_root_on_a_read_only_root_file_system() -> None:
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    container = relay_container()["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_one_active_relay_that_drains_before_it_is_killed() -> None:
    deployment = manifest("Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(config()["OUTBOX_SHUTDOWN_TIMEOUT"])
    resources = relay_container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_database_url_is_read_from_the_mounted_secret() -> None:
    settings = config()
    assert "OUTBOX_DB_URL" not in settings
    url_file = Path(settings["OUTBOX_DB_URL_FILE"])
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in relay_container()["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(url_file.parent)])
    secret = manifest("Secret", volume["secret"]["secretName"])
    assert url_file.name in secret["stringData"]
    # Owner and group (fsGroup) may read; nobody else.
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def test_configuration_uses_only_settings_the_relay_reads() -> None:
    known = relay_settings()
    assert set(config()) <= known, set(config()) - known
    job = manifest("Job", "outbox-migrate")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in job["env"]} <= known
    commented = re.findall(r"^#\s*(OUTBOX_[A-Z_]+):", (K8S / "configmap.yaml").read_text(),
                           re.MULTILINE)
    assert set(commented) <= known, set(commented) - known


# -- systemd ----------------------------------------------------------------------------------


def test_env_example_uses_only_settings_the_relay_reads() -> None:
    names = re.findall(r"^#?(OUTBOX_[A-Z_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert names
    assert set(names) <= relay_settings(), set(names) - relay_settings()
    assert "OUTBOX_DB_URL" not in names, "the URL is a credential, not an environment setting"


def test_systemd_unit_is_hardened_and_stops_after_the_relay_drains() -> None:
    settings = unit_settings(UNIT.read_text())
    expected = {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "Restart": "on-failure",
        "KillSignal": "SIGTERM", "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    assert settings["EnvironmentFile"] == ["/etc/outbox-relay/outbox-relay.env"]
    assert settings["LoadCredential"] == ["db-url:/etc/outbox-relay/db-url"]
    assert settings["Environment"] == ["OUTBOX_DB_URL_FILE=%d/db-url"]
    stop = settings["TimeoutStopSec"][0]
    assert stop.endswith("s") and int(stop[:-1]) > 30  # OUTBOX_SHUTDOWN_TIMEOUT's default
    assert settings["ExecStart"] == ["/opt/outbox-relay/bin/outbox relay"]


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify insists that the program exists: point ExecStart at a stand-in, change nothing else.
    program = tmp_path / "outbox"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(
        "ExecStart=/opt/outbox-relay/bin/outbox", f"ExecStart={program}"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if UNIT.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


# -- the container image ----------------------------------------------------------------------


def makefile_install_commands() -> list[str]:
    recipe = re.search(r"^\$\(STAMP\):.*?\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(),
                       re.MULTILINE)
    assert recipe is not None, "the Makefile's install recipe"
    return [line.strip() for line in recipe[1].splitlines()]


def normalised(command: str) -> str:
    """A pip/venv command without its interpreter and the flags that only change verbosity or
    caching; the package spec without the editable flag and the dev extra."""
    words = [w for w in shlex.split(command)
             if w not in ("--quiet", "-q", "--no-cache-dir", "-e")]
    words = words[words.index("-m"):] if "-m" in words else words
    return " ".join("." if w == ".[dev]" else w for w in words)


def test_image_installs_the_package_as_the_makefile_does() -> None:
    make = [normalised(c) for c in makefile_install_commands() if "-m" in c]
    run = [part for name, args in build_stage() if name == "RUN" for part in args.split("&&")]
    image = [normalised(c) for c in run]
    # The same three steps: a venv, pip upgraded, `pip install` of the package.
    assert [c.split()[:2] for c in make] == [["-m", "venv"], ["-m", "pip"], ["-m", "pip"]]
    assert make[1:] == image[1:], (make, image)
    assert image[0].startswith("-m venv /opt/outbox-relay")


def test_image_copies_everything_the_package_is_built_from() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    needed = {"pyproject.toml", project["project"]["readme"]}
    package_dirs = setuptools.get("package-dir", {})
    for package in setuptools["packages"]:
        needed.add(package_dirs.get(package, package.replace(".", "/")).split("/")[0])
    copied: set[str] = set()
    for name, args in build_stage():
        if name == "COPY" and not args.startswith("--from"):
            copied.update(args.split()[:-1])
    assert needed <= copied, needed - copied


def test_image_runs_non_root_with_a_health_check_on_the_metrics_port() -> None:
    instructions = dockerfile_instructions()
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    env = runtime_env()
    assert env["OUTBOX_METRICS_PORT"] == str(METRICS_PORT)
    assert env["OUTBOX_METRICS_HOST"] == "0.0.0.0"
    assert [args for name, args in instructions if name == "EXPOSE"] == [str(METRICS_PORT)]
    health = [args for name, args in instructions if name == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and "OUTBOX_METRICS_PORT" in health[0]
    # The settings the image sets are ones the relay reads.
    outbox_env = {key for key in env if key.startswith("OUTBOX_")}
    assert outbox_env <= relay_settings()


@pytest.mark.slow
def test_package_built_from_the_copied_files_ships_its_sql(tmp_path: Path) -> None:
    """The image's build stage in miniature: only what it copies, built by pip."""
    source = tmp_path / "src"
    source.mkdir()
    for name, args in build_stage():
        if name == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for item in sources:
                path = REPO / item
                if path.is_dir():
                    shutil.copytree(path, source / item,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(path, source / item)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
         str(tmp_path / "wheels"), str(source)],
        capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and re.search(
            r"No matching distribution|Could not find a version|NewConnectionError|"
            r"Temporary failure in name resolution", result.stderr):
        pytest.skip("pip could not fetch the build backend (offline?)")
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in files
                            if n.endswith("entry_points.txt"))
    for expected in ("outbox/migrations/0001_outbox_table.sql", "outbox/sql/schema.sql",
                     "relay/sql/poll.sql", "relay/sql/ops.sql", "outbox/cli.py",
                     "relay/doctor.py"):
        assert expected in files, expected
    assert "outbox = relay.cli:main" in entry_points
