"""deploy/ checked against the node it deploys, statically.

Manifests parse; every port and config key they name is one the node really has; the configs
pass the node's own validator; the alert rules and the docs name only metrics and labels the
node exports. The probes are not checked here but run: tests/integration/test_deploy_probes.py
starts a node from every config and probes it as the manifests and the Dockerfile declare.
"""

from __future__ import annotations

import ast
import re
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodes.config import parse_config
from nodes.metrics import NodeMetrics, file_prefixes
from resolver.cache import LookupCache

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONFIGS = sorted((DEPLOY / "config").glob("*.toml"))


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_there_is_a_config_for_every_role() -> None:
    roles = {tomllib.loads(p.read_text())["node"]["role"] for p in CONFIGS}
    assert roles == {"top-level", "secondary", "enterprise", "recursive"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_pass_the_node_validator(path: Path) -> None:
    config = parse_config(tomllib.loads(path.read_text()), base_dir=path.parent)
    # 9641 is also where the probes and the Dockerfile's HEALTHCHECK ask (/healthz, /readyz)
    assert config.node.listen.endswith(":2641") and config.node.metrics_listen.endswith(":9641")


def test_the_configmap_carries_exactly_the_config_files() -> None:
    (configmap,) = [m for m in manifests() if m["kind"] == "ConfigMap" and m["metadata"]["name"] == "idis-config"]
    assert configmap["data"] == {p.name: p.read_text() for p in CONFIGS}


def workloads() -> list[dict[str, Any]]:
    """The workloads that run identifier nodes (not the PostgreSQL members of patroni.yaml)."""
    return [m for m in manifests() if m["kind"] in ("StatefulSet", "Deployment") and runs_a_node(m)]


def runs_a_node(workload: dict[str, Any]) -> bool:
    return "--config" in workload["spec"]["template"]["spec"]["containers"][0].get("args", [])


def test_every_workload_runs_a_config_that_exists_with_the_ports_it_listens_on() -> None:
    names = {p.name for p in CONFIGS}
    assert len(workloads()) == 5
    for w in workloads():
        (container,) = w["spec"]["template"]["spec"]["containers"]
        config_path = container["args"][container["args"].index("--config") + 1]
        assert config_path.startswith("/etc/idis/") and Path(config_path).name in names
        config = parse_config(tomllib.loads((DEPLOY / "config" / Path(config_path).name).read_text()))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == int(config.node.listen.rpartition(":")[2])
        assert ports["metrics"] == int(config.node.metrics_listen.rpartition(":")[2])
        # one metrics port whatever [node] workers says: the supervisor's, summing its workers
        assert [name for name in ports if name.startswith("metrics")] == ["metrics"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        for tls_file in (config.tls.cert, config.tls.key, config.tls.ca):
            assert str(Path(tls_file).parent) in mounts  # the certificates are mounted where the config reads them
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == ports["metrics"]
        assert w["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_authoritative_nodes_are_statefulsets_with_a_volume_where_the_config_stores() -> None:
    for w in workloads():
        (container,) = w["spec"]["template"]["spec"]["containers"]
        name = Path(container["args"][-1]).name
        config = parse_config(tomllib.loads((DEPLOY / "config" / name).read_text()))
        if config.node.role == "recursive" or config.storage.engine == "postgresql":
            assert w["kind"] == "Deployment"  # nothing durable of its own: scales with replicas
            continue
        assert w["kind"] == "StatefulSet"
        claim = w["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert config.database_path.parent == Path(mounts[claim])


def test_a_site_on_postgresql_runs_several_servers_on_every_patroni_member() -> None:
    (site,) = [w for w in workloads() if w["metadata"]["name"] == "idis-secondary-site"]
    (container,) = site["spec"]["template"]["spec"]["containers"]
    config = parse_config(tomllib.loads((DEPLOY / "config" / Path(container["args"][-1]).name).read_text()))
    assert config.storage.engine == "postgresql" and site["spec"]["replicas"] >= 2
    (patroni,) = [m for m in manifests() if m["kind"] == "StatefulSet" and m["metadata"]["name"] == "idis-patroni"]
    namespace, service = patroni["metadata"]["namespace"], patroni["spec"]["serviceName"]
    members = [f"{patroni['metadata']['name']}-{n}.{service}.{namespace}.svc.cluster.local:5432" for n in range(3)]
    assert patroni["spec"]["replicas"] == 3
    assert config.storage.dsn.split("@", 1)[1].rsplit("/", 1)[0].split(",") == members
    # The member config in Kubernetes fails over as the machines' one does (the one the failover
    # test runs): the same consensus timings, synchronous mode and rewinding.
    (settings,) = [m for m in manifests() if m["kind"] == "ConfigMap" and m["metadata"]["name"] == "idis-patroni"]
    in_k8s = yaml.safe_load(settings["data"]["patroni.yml"])
    shipped = yaml.safe_load((DEPLOY / "postgresql" / "patroni.yml").read_text())
    for key in ("ttl", "loop_wait", "retry_timeout", "maximum_lag_on_failover", "synchronous_mode"):
        assert in_k8s["bootstrap"]["dcs"][key] == shipped["bootstrap"]["dcs"][key], key
    assert in_k8s["bootstrap"]["dcs"]["postgresql"]["use_pg_rewind"] is True
    assert in_k8s["scope"] == shipped["scope"]
    labels = patroni["spec"]["template"]["metadata"]["labels"]
    assert in_k8s["kubernetes"]["labels"].items() <= labels.items()
    (primary,) = [m for m in manifests() if m["kind"] == "Service" and m["metadata"]["name"] == "idis-postgresql"]
    assert primary["spec"]["selector"] == {**in_k8s["kubernetes"]["labels"], "role": "master"}


def test_services_select_their_workloads_and_expose_their_ports() -> None:
    services = [m for m in manifests() if m["kind"] == "Service"]
    for w in workloads():
        labels = w["spec"]["template"]["metadata"]["labels"]
        (container,) = w["spec"]["template"]["spec"]["containers"]
        port_names = {p["name"] for p in container["ports"]}
        mine = [s for s in services if all(labels.get(k) == v for k, v in s["spec"]["selector"].items())]
        assert mine, w["metadata"]["name"]
        for service in mine:
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_systemd_unit_runs_the_node_program_and_stops_it_gracefully() -> None:
    unit = (DEPLOY / "systemd" / "idis-node@.service").read_text()
    assert "ExecStart=/opt/idis/.venv/bin/idis-node --config /etc/idis/%i.toml" in unit
    assert "KillSignal=SIGTERM" in unit and "User=idis" in unit
    assert "ReadWritePaths=/var/lib/idis" in unit


def test_dockerfile_runs_as_non_root_with_a_health_check_and_the_ports() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert "EXPOSE 2641 9641" in dockerfile
    assert re.search(r"^HEALTHCHECK .* CMD \[", dockerfile.replace("\\\n", " "), re.M)  # run by the probe test
    assert 'ENTRYPOINT ["idis-node"]' in dockerfile


def exported_metrics(tmp_path: Path) -> dict[str, set[str]]:
    """Every metric a node exports, by family and by sample name, with its label names."""
    metrics = NodeMetrics("n", "enterprise")
    metrics.watch_cache(LookupCache(10, 1000), "n")
    database = tmp_path / "prefixes.sqlite3"  # what idis_identifiers is read from at scrape time
    db = sqlite3.connect(database)
    db.execute("CREATE TABLE prefixes (display TEXT, kind INTEGER, identifier_count INTEGER)")
    db.execute("INSERT INTO prefixes VALUES ('88.1', 1, 3)")
    db.commit()
    db.close()
    metrics.watch_prefixes(file_prefixes(database))
    # One sample of each metric with labels, recorded the way the node records them.
    metrics.requests.labels("Resolve", "OK").inc()
    metrics.latency.labels("Resolve").observe(0.001)
    metrics.store_latency.labels("get").observe(0.001)
    metrics.registrations.labels("88.1").inc()
    exported: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels = set(sample.labels) - {"le"}  # a histogram's bucket bound, not a label of the metric
            exported.setdefault(family.name, set()).update(labels)
            exported.setdefault(sample.name, set()).update(labels)
    return exported


def test_alert_rules_use_only_metrics_and_labels_the_node_exports(tmp_path: Path) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exported = exported_metrics(tmp_path)
    used: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule)
            for name, matchers in re.findall(r"\b(idis_[a-z_]+)(?:\{([^}]*)\})?", rule["expr"]):
                assert name in exported, f"{rule['alert']}: {name} is not exported"
                labels = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers))
                assert labels <= exported[name], f"{rule['alert']}: {name} has no label {labels - exported[name]}"
                used.add(name)
    assert used, "no idis metric in the rules"


DOCUMENTS = [
    DEPLOY.parent / "README.md",
    DEPLOY.parent / "ARCHITECTURE.md",
    DEPLOY / "README.md",
    DEPLOY.parent / "nodes" / "metrics.py",  # its docstring
]


def prose(document: Path) -> str:
    text = document.read_text()
    return (ast.get_docstring(ast.parse(text)) or "") if document.suffix == ".py" else text


def test_documented_metric_labels_are_the_exported_ones(tmp_path: Path) -> None:
    exported = exported_metrics(tmp_path)
    documented = 0
    for document in DOCUMENTS:
        for name, labels in re.findall(r"\b(idis_[a-z_]+)\{([a-z_, ]*)\}", prose(document)):
            assert name in exported, f"{document.name}: {name} is not exported"
            names = {label.strip() for label in labels.split(",") if label.strip()}
            assert names == exported[name], f"{document.name}: {name}{{{labels}}}, exported with {exported[name]}"
            documented += 1
    assert documented
