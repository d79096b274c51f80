"""Reading Prometheus metrics the daemons serve."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> dict[tuple, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def value(samples: dict, name: str, /, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def promtool_lint(port: int) -> str:
    """What `promtool check metrics` (Debian's prometheus package) says of
    the daemon's metrics: "" when they follow the naming conventions."""
    import subprocess

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    return "" if r.returncode == 0 and not (r.stdout + r.stderr).strip() else (r.stdout + r.stderr or "failed")
