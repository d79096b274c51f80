"""What contrib/ ships for Prometheus and Grafana, checked with promtool
(Debian's prometheus package): the alert rules load and pass their unit
tests (a healthy fleet fires nothing; each alert fires when it should),
and every dashboard query is valid PromQL over series the daemons
really export. The daemons' own metrics pass `promtool check metrics` in
test_metrics.py and test_vaults.py."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import yaml

from support.agents import REPO

CONTRIB = REPO / "contrib"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def exported() -> set[str]:
    """Every metric name the two daemons' metrics modules declare."""
    names: set[str] = set()
    for src in (REPO / "agent" / "metrics.py", REPO / "agent" / "controller" / "metrics.py"):
        names |= set(re.findall(r'"(blockferry_[a-z_]+)"', src.read_text()))
    return names


def used(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"\bblockferry_[a-z_]+", expr)}


def test_alert_rules_load_and_pass_their_unit_tests():
    r = promtool("check", "rules", "blockferry.rules.yml", cwd=CONTRIB / "prometheus")
    assert r.returncode == 0 and "SUCCESS: 7 rules found" in r.stdout, r.stdout + r.stderr
    r = promtool("test", "rules", "blockferry.rules.test.yml", cwd=CONTRIB / "prometheus")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    rules = yaml.safe_load((CONTRIB / "prometheus" / "blockferry.rules.yml").read_text())
    alerts = {x["alert"]: x["expr"] for g in rules["groups"] for x in g["rules"]}
    assert {
        "BlockferryHostDown",
        "BlockferryBackupPointUnhealthy",
        "BlockferryBackupStale",
        "BlockferryTasksFailing",
        "BlockferryRepositoryNearlyFull",
    } <= set(alerts)
    unknown = {n for e in alerts.values() for n in used(e)} - exported()
    assert not unknown, unknown
    # every alert is exercised by the unit tests, and a healthy fleet fires none of them
    tests = yaml.safe_load((CONTRIB / "prometheus" / "blockferry.rules.test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == set(alerts), set(alerts) - fired
    quiet = {t["alertname"] for t in tests[0]["alert_rule_test"] if not t["exp_alerts"]}
    assert quiet == set(alerts)


def test_dashboards_query_real_series_in_valid_promql():
    for path in sorted((CONTRIB / "grafana").glob("*.json")):
        d = json.loads(path.read_text())
        assert d["uid"] and d["title"].startswith("blockferry") and d["panels"], path
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), path
        exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
        unknown = {n for e in exprs for n in used(e)} - exported()
        assert not unknown, (path.name, unknown)
        # promtool parses each query as a recording rule
        rules = {"groups": [{"name": "q", "rules": [{"record": f"q:{i}", "expr": e} for i, e in enumerate(exprs)]}]}
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump(rules, f)
            f.flush()
            r = promtool("check", "rules", f.name)
        assert r.returncode == 0, (path.name, r.stdout + r.stderr)
