"""The benchmark suite in --quick mode runs end to end; no assertion here is about time."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bench import cli
from tests.support.services import Services

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MACHINE_KEYS = {"cpu_model", "cpus", "memory_mb", "python", "postgresql", "kafka", "git_commit",
                "relay_native"}


def _assert_ledger_held(ledger: dict[str, Any]) -> None:
    assert ledger["held"] is True, ledger
    assert ledger["lost"] == 0 and ledger["phantom"] == 0, ledger


def _assert_available_or_explained(outcome: dict[str, Any]) -> bool:
    """True when the phase ran; otherwise it must say why it could not (not fail)."""
    assert "error" not in outcome, outcome.get("traceback") or outcome
    if outcome["available"] is False:
        assert outcome["reason"], outcome
        return False
    return True


def _assert_plots(out: Path, json_file: Path, results: dict[str, Any]) -> None:
    """The drain timeline and the latency percentiles are SVG files next to the JSON, named in
    it, with one line per drained source (and per source and percentile)."""
    assert set(results["plots"]) == {"drain", "latency"}, results.get("plots")
    drained = [name for name, result in results["sources"].items()
               if result.get("drain", {}).get("drain", {}).get("timeline")]
    measured = [name for name, result in results["sources"].items()
                if result.get("latency", {}).get("rates")]
    for kind, sources in (("drain", drained), ("latency", measured)):
        plot = out / results["plots"][kind]
        assert plot.name == f"{json_file.stem}-{kind}.svg"
        root = ET.fromstring(plot.read_text())
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        labels = [line.findtext("{http://www.w3.org/2000/svg}title") or ""
                  for line in root.iter("{http://www.w3.org/2000/svg}polyline")]
        for name in sources:
            assert any(label.startswith(name) for label in labels), (kind, name, labels)
        assert all(line.get("points") for line in root.iter("{http://www.w3.org/2000/svg}polyline"))


@pytest.mark.timeout(900)
def test_quick_run_writes_well_formed_results_and_every_ledger_holds(
    services: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main([
        "--quick", "--quiet", "--out", str(tmp_path), "--rates", "200", "--duration", "1",
        "--db", services.db_url, "--kafka", services.kafka_bootstrap,
        "--mongo", services.mongo_url,
    ])
    printed = capsys.readouterr().out
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    results = json.loads(files[0].read_text())
    assert code == 0, printed

    assert results["machine"].keys() >= MACHINE_KEYS
    assert results["loadavg_before"] and results["loadavg_after"]
    assert "postgres-poll" in printed and "target" in printed

    poll = results["sources"]["postgres-poll"]
    drain = poll["drain"]
    assert _assert_available_or_explained(drain), "the polling relay must always be measurable"
    _assert_ledger_held(drain["ledger"])
    assert drain["ledger"]["committed"] == 2_000 and drain["ledger"]["rolled_back"] > 0
    figures = drain["drain"]
    assert figures["events_per_s"] > 0 and figures["relay_peak_rss_mb"] > 0
    assert figures["relay_cpu_s"] > 0 and figures["relay_exit_code"] == 0
    latency = poll["latency"]
    assert _assert_available_or_explained(latency)
    [rate] = latency["rates"]
    assert rate["offered_rate"] == 200 and rate["events"] > 0
    assert rate["p50_ms"] <= rate["p95_ms"] <= rate["p99_ms"] <= rate["max_ms"]
    _assert_ledger_held(rate["ledger"])

    for name, result in results["sources"].items():
        for phase in ("drain", "latency", "mongo"):
            outcome = result.get(phase)
            if outcome is None or not _assert_available_or_explained(outcome):
                continue
            for ledger in [outcome.get("ledger"), *(r["ledger"] for r in outcome.get("rates", []))]:
                if ledger is not None:
                    _assert_ledger_held(ledger)
        if name.startswith("postgres-wal") and result.get("drain", {}).get("raw_decode"):
            drain_outcome = result["drain"]
            # Binary mode (the relay's format) is the reference; text mode is shown beside it.
            assert drain_outcome["raw_decode"]["mode"] == "binary", drain_outcome["raw_decode"]
            assert drain_outcome["raw_decode_text"]["mode"] == "text"
            for key in ("raw_decode", "raw_decode_text"):
                assert drain_outcome[key].get("events_per_s", 1) > 0
            if drain_outcome["available"]:
                assert drain_outcome["drain"]["fraction_of_raw_decode"] > 0
                assert drain_outcome["drain"]["fraction_of_raw_decode_text"] > 0

    _assert_plots(tmp_path, files[0], results)

    cases = results["write_overhead"]["cases"]
    assert {(c["mode"], c["events_per_transaction"]) for c in cases} == {
        ("table", 1), ("table", 100), ("message", 1), ("message", 100)}
    for case in cases:
        assert case["transactions"] > 0 and case["publish_us_per_event"] > 0
        _assert_ledger_held(case["ledger"])

    for key in ("consumer_rate", "consumer_rate_pipeline"):
        if _assert_available_or_explained(results[key]):
            _assert_ledger_held(results[key]["ledger"])


@pytest.mark.timeout(600)
def test_quick_sharded_phase_drains_with_one_two_and_three_relays(
    services: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main([
        "--quick", "--quiet", "--out", str(tmp_path), "--phases", "sharded",
        "--source", "postgres-poll,postgres-wal,postgres-wal-tableless",
        "--db", services.db_url, "--kafka", services.kafka_bootstrap,
    ])
    printed = capsys.readouterr().out
    [file] = tmp_path.glob("*.json")
    results = json.loads(file.read_text())
    assert code == 0, printed
    for name in ("postgres-poll", "postgres-wal"):
        sharded = results["sources"][name]["sharded"]
        assert _assert_available_or_explained(sharded), f"{name}: sharded drain"
        assert [run["relays"] for run in sharded["runs"]] == [1, 2, 3]
        for run in sharded["runs"]:
            _assert_ledger_held(run["ledger"])
            assert run["ledger"]["committed"] == 2_000
            assert run["events_per_s"] > 0 and run["relay_cpu_us_per_event"] > 0
            assert run["relay_exit_codes"] == [0] * run["relays"]
        assert "sharded drain, 3 relay(s)" in printed
    tableless = results["sources"]["postgres-wal-tableless"]["sharded"]
    assert tableless["available"] is False and "table" in tableless["reason"]
