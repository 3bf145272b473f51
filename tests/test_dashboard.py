"""The Grafana dashboard and the Prometheus alert rules query only metrics that exist.

Names come from a real ``/metrics`` scrape of the app; label names from the
``Metrics`` object.  With promtool installed the rules are also checked and
unit-tested (each alert fires on a series that should fire it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from dicomcache.http.app import make_app
from dicomcache.metrics import Metrics
from tests.conftest import SettingsFactory

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
DASHBOARD = DASHBOARDS / "dicomcache.json"
ALERTS = DASHBOARDS / "alerts.yml"
NAME = re.compile(r"\b(dicomcache_[a-z0-9_]+)\b")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                              "_created"),
            "gauge": ("",), "info": ("_info",)}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict)
                         else var["query"])
    return exprs


def alert_exprs(text: str) -> list[str]:
    """Every ``expr:`` of a rules file (plain or ``|`` block), without a YAML library."""
    exprs: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value in ("|", ">", "|-", ">-"):
            block = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt.strip())
            value = " ".join(b for b in block if b)
        exprs.append(value)
    return exprs


async def scrape_names(client: TestClient) -> tuple[set[str], dict[str, str]]:
    text = await (await client.get("/metrics")).text()
    names: set[str] = set()
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        types[family.name] = family.type
        # Labelled metrics with no children yet have no samples: derive from the type.
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names, types


def label_names() -> dict[str, set[str]]:
    """Sample name → its label names (``le`` on buckets), from ``Metrics``' registry.

    Read through the public ``registry.collect()``.  A labelled metric has no
    samples until it has a child, so each gets one first: ``labels()`` accepts
    exactly as many values as the metric has label names.
    """
    metrics = Metrics()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for count in range(1, 10):
                try:
                    metric.labels(*["x"] * count)
                except ValueError:  # not that many label names (or none at all)
                    continue
                break
    out: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory) -> TestClient:
    return await aiohttp_client(make_app(make_settings()))


async def test_every_queried_metric_exists(client: TestClient) -> None:
    names, types = await scrape_names(client)
    exprs = {"dashboard": dashboard_exprs(), "alerts": alert_exprs(ALERTS.read_text())}
    assert len(exprs["dashboard"]) >= 30 and len(exprs["alerts"]) >= 5
    for where, items in exprs.items():
        for expr in items:
            used = NAME.findall(expr)
            assert used, f"{where}: {expr!r} queries no dicomcache metric"
            for name in used:
                assert name in names, f"{where}: {name} (in {expr!r}) is not in /metrics"
            # Counters and histograms are read with rate()/increase(), gauges are not.
            for func, name in re.findall(r"\b(rate|increase|deriv|delta)\((dicomcache_\w+)", expr):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                if func in ("rate", "increase"):
                    assert types.get(base) in ("counter", "histogram"), (where, func, name)
                else:
                    assert types.get(base) == "gauge", (where, func, name)


async def test_grouping_labels_exist_on_the_metrics(client: TestClient) -> None:
    labels = label_names()
    common = {"instance", "job"}
    exprs = dashboard_exprs() + alert_exprs(ALERTS.read_text())
    for expr in exprs:
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                have = set().union(*(labels.get(n, set()) for n in NAME.findall(expr)))
                assert label in have | common, f"label {label!r} not on metrics of {expr!r}"


async def test_dashboard_shows_every_metric(client: TestClient) -> None:
    _, types = await scrape_names(client)
    used = {re.sub(r"_(total|bucket|sum|count)$", "", n)
            for e in dashboard_exprs() for n in NAME.findall(e)}
    ours = {n for n in types if n.startswith("dicomcache_")}
    # A new metric needs a panel in dashboards/dicomcache.json (the overview for people
    # on call); Grafana's "Export > Save to file" after adding it gives the JSON.
    assert ours - used == set(), "metrics no panel shows"


def test_dashboard_is_importable_and_provisionable() -> None:
    d = dashboard()
    assert d["uid"] == "dicomcache" and d["title"] and d["schemaVersion"] >= 36
    # No __inputs: the same file imports through the UI and loads from provisioning;
    # the data source is a variable (the default Prometheus one unless chosen).
    assert "__inputs" not in d
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in t["expr"], t["expr"]
    provider = (DASHBOARDS / "provisioning" / "dashboards.yml").read_text()
    assert "apiVersion: 1" in provider and "type: file" in provider


def _system_yaml(path: Path) -> Any:
    """Parse YAML with the system Python's PyYAML (python3-yaml), if there is one."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3")
    proc = subprocess.run(
        [python, "-c", "import json, sys, yaml; "
                       "print(json.dumps(yaml.safe_load(open(sys.argv[1]))))", str(path)],
        capture_output=True, text=True, timeout=60, check=False)
    if "No module named 'yaml'" in proc.stderr:
        pytest.skip("python3-yaml is not installed (apt-get install python3-yaml)")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_alert_rules_are_well_formed() -> None:
    rules = _system_yaml(ALERTS)["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"DicomcacheUpstreamDown", "DicomcacheIntegrityFailuresRising",
            "DicomcacheCacheNearFull", "DicomcacheCacheDegraded", "DicomcacheRelayQueueGrowing",
            "DicomcacheAuditTrailFailing", "DicomcacheAuditRecordsLost"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # The YAML-free extraction used above reads the same expressions.
    assert [" ".join(r["expr"].split()) for r in rules] == [
        " ".join(e.split()) for e in alert_exprs(ALERTS.read_text())]


def without_annotations(text: str) -> str:
    """The rules file with every ``annotations:`` block left out."""
    out: list[str] = []
    skip_deeper_than: int | None = None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not line.strip() or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if line.strip() == "annotations:":
            skip_deeper_than = indent
            continue
        out.append(line)
    return "\n".join(out) + "\n"


PROMTOOL = shutil.which("promtool")
RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'dicomcache_upstream_up{{instance="a"}}'
        values: '1 1 0 0 0 0 0'
      - series: 'dicomcache_build_info{{instance="a",version="0.1.0"}}'
        values: '1x400'
    alert_rule_test:
      - {{eval_time: 3m, alertname: DicomcacheUpstreamDown, exp_alerts: []}}
      - eval_time: 5m
        alertname: DicomcacheUpstreamDown
        exp_alerts: [{{exp_labels: {{severity: critical, instance: a}}}}]
      - {{eval_time: 10m, alertname: DicomcacheNotScraped, exp_alerts: []}}
  - interval: 1m
    input_series:
      # quiet for 6 h, then 1 rejected body a minute
      - series: 'dicomcache_integrity_failures_total{{instance="a",cause="md5_mismatch"}}'
        values: '0x360 1+1x30'
    alert_rule_test:
      - {{eval_time: 6h, alertname: DicomcacheIntegrityFailuresRising, exp_alerts: []}}
      - eval_time: 6h20m
        alertname: DicomcacheIntegrityFailuresRising
        exp_alerts: [{{exp_labels: {{severity: warning, instance: a}}}}]
      - {{eval_time: 10m, alertname: DicomcacheNotScraped,
          exp_alerts: [{{exp_labels: {{severity: critical}}}}]}}
  - interval: 1m
    input_series:
      # at 95 % of the bound and evicting 1 of 100 entries a minute (60 an hour)
      - series: 'dicomcache_cache_size_bytes{{instance="a"}}'
        values: '95x200'
      - series: 'dicomcache_cache_max_bytes{{instance="a"}}'
        values: '100x200'
      - series: 'dicomcache_cache_entries{{instance="a"}}'
        values: '100x200'
      - series: 'dicomcache_cache_evictions_total{{instance="a"}}'
        values: '0+1x200'
      # same fill, but hardly evicting: a warm LRU cache, no alert
      - series: 'dicomcache_cache_size_bytes{{instance="b"}}'
        values: '95x200'
      - series: 'dicomcache_cache_max_bytes{{instance="b"}}'
        values: '100x200'
      - series: 'dicomcache_cache_entries{{instance="b"}}'
        values: '100x200'
      - series: 'dicomcache_cache_evictions_total{{instance="b"}}'
        values: '0x200'
    alert_rule_test:
      - eval_time: 2h
        alertname: DicomcacheCacheNearFull
        exp_alerts: [{{exp_labels: {{severity: warning, instance: a}}}}]
  - interval: 1m
    input_series:
      # a's cache disk fills at 10m (degraded) and stays full; b blips for a minute
      - series: 'dicomcache_cache_degraded{{instance="a",cause="disk_full"}}'
        values: '0x10 1x20'
      - series: 'dicomcache_cache_degraded{{instance="b",cause="read_only"}}'
        values: '0x10 1 0x19'
    alert_rule_test:
      - {{eval_time: 12m, alertname: DicomcacheCacheDegraded, exp_alerts: []}}
      - eval_time: 20m
        alertname: DicomcacheCacheDegraded
        exp_alerts: [{{exp_labels: {{severity: warning, instance: a, cause: disk_full}}}}]
  - interval: 1m
    input_series:
      # one file found bad by the scrubber at 30m; another instance never has one
      - series: 'dicomcache_cache_bad_files_total{{instance="a",found_by="scrub"}}'
        values: '0x30 1x60'
      - series: 'dicomcache_cache_bad_files_total{{instance="b",found_by="scrub"}}'
        values: '0x90'
    alert_rule_test:
      - {{eval_time: 20m, alertname: DicomcacheBadStoredFiles, exp_alerts: []}}
      - eval_time: 40m
        alertname: DicomcacheBadStoredFiles
        exp_alerts: [{{exp_labels: {{severity: warning, instance: a}}}}]
  - interval: 1m
    input_series:
      - series: 'dicomcache_relay_queue_depth{{instance="a",destination="pacs"}}'
        values: '0+2x120'
      - series: 'dicomcache_relay_queue_oldest_age_seconds{{instance="a",destination="pacs"}}'
        values: '0+60x120'
      # a burst being drained
      - series: 'dicomcache_relay_queue_depth{{instance="a",destination="ris"}}'
        values: '500-5x100'
      - series: 'dicomcache_relay_queue_oldest_age_seconds{{instance="a",destination="ris"}}'
        values: '0+60x120'
    alert_rule_test:
      - {{eval_time: 30m, alertname: DicomcacheRelayQueueGrowing, exp_alerts: []}}
      - eval_time: 1h30m
        alertname: DicomcacheRelayQueueGrowing
        exp_alerts: [{{exp_labels: {{severity: warning, instance: a, destination: pacs}}}}]
  - interval: 1m
    input_series:
      # the audit file fails from 10m on (a full disk); b stays fine
      - series: 'dicomcache_audit_up{{instance="a"}}'
        values: '1x10 0x20'
      - series: 'dicomcache_audit_up{{instance="b"}}'
        values: '1x30'
      # records dropped at 20m (queue full); syslog collector down from 5m on
      - series: 'dicomcache_audit_dropped_total{{instance="a",sink="file",cause="queue_full"}}'
        values: '0x20 5x10'
      - series: 'dicomcache_audit_syslog_failures_total{{instance="a"}}'
        values: '0x5 0+1x25'
      - series: 'dicomcache_audit_records_total{{instance="a",sink="syslog"}}'
        values: '0+10x5 50x25'
    alert_rule_test:
      - {{eval_time: 9m, alertname: DicomcacheAuditTrailFailing, exp_alerts: []}}
      - eval_time: 12m
        alertname: DicomcacheAuditTrailFailing
        exp_alerts: [{{exp_labels: {{severity: critical, instance: a}}}}]
      - {{eval_time: 15m, alertname: DicomcacheAuditRecordsLost, exp_alerts: []}}
      - eval_time: 22m
        alertname: DicomcacheAuditRecordsLost
        exp_alerts: [{{exp_labels: {{severity: critical, instance: a, sink: file}}}}]
      - {{eval_time: 10m, alertname: DicomcacheAuditSyslogFailing, exp_alerts: []}}
      - eval_time: 25m
        alertname: DicomcacheAuditSyslogFailing
        exp_alerts: [{{exp_labels: {{severity: warning, instance: a}}}}]
"""


@pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"),
                    reason="promtool is not installed (Debian package prometheus; ./run test "
                    "installs it); names and structure are still checked above")
def test_alert_rules_with_promtool(tmp_path: Path) -> None:
    assert PROMTOOL is not None, "CI needs promtool: ./run test installs Debian's prometheus"
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # promtool compares annotations too: test a copy without them (labels say enough).
    rules = tmp_path / "alerts.yml"
    rules.write_text(without_annotations(ALERTS.read_text()))
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(textwrap.dedent(RULE_TESTS).format(rules=json.dumps(str(rules))))
    run = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
