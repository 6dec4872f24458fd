"""The idis CLI as a user runs it, against the real local hierarchy."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from bench.templates import AUTOMOTIVE_PART
from nodes.hierarchy import NodeSpec
from nodes.trust.certificates import ensure_ca, issue
from resolver.cli import (
    ENVIRONMENT,
    EXIT_CODES,
    EXIT_DENIED,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    build_parser,
    main,
)
from tests.integration.conftest import Cluster


def idis(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_resolve_prints_the_record_and_traces_the_referral_chain(hierarchy: Cluster) -> None:
    top = hierarchy.address("top-level")
    code, text = idis("resolve", "--root", top, "88.100.1/SN-0001", "--trace", "--repeat", "2")
    assert code == 0
    assert "88.100.1/SN-0001  (version 1)" in text
    assert "MOTOR-X200" in text
    assert "referral 88.100 ->" in text and "referral 88.100.1 ->" in text
    assert "3 network hop(s)" in text
    assert "(cache)" in text and "0 network hop(s)" in text


def test_resolve_json(hierarchy: Cluster) -> None:
    code, text = idis("resolve", "--root", hierarchy.address("top-level"), "88.100.2/PART-0001", "--json")
    assert code == 0
    doc = json.loads(text)
    assert doc["identifier"] == "88.100.2/PART-0001"
    assert doc["values"][1] == {
        **doc["values"][1],
        "index": 2,
        "type": "EMAIL",
        "data": {"format": "string", "value": "quality@supplier-2.example.com"},
    }


def test_resolve_reports_errors_with_status_and_exit_code(hierarchy: Cluster) -> None:
    code, text = idis("resolve", "--root", hierarchy.address("top-level"), "88.100.1/none", "--json")
    assert code == EXIT_NOT_FOUND
    assert json.loads(text)["error"]["status"] == "NOT_FOUND"


def test_register_delete_and_list(hierarchy: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    root = ("--root", hierarchy.address("top-level"))
    code, text = idis("register", *root, "88.100.1/CLI-1", "--value", "URL=https://x/1", "--value", "5:EMAIL=a@b")
    assert (code, text.strip()) == (0, "created: 88.100.1/CLI-1 (version 1)")
    code, text = idis("register", *root, "88.100.1/CLI-1", "--value", "URL=https://x/1", "--value", "5:EMAIL=a@b")
    assert "already existed (identical)" in text
    code, text = idis("register", *root, "88.100.1/CLI-1", "--value", "URL=https://x/2", "--replace")
    assert "replaced: 88.100.1/CLI-1 (version 2)" in text
    code, text = idis("resolve", *root, "88.100.1/CLI-1", "--json")
    assert [v["index"] for v in json.loads(text)["values"]] == [1]
    code, text = idis("prefix", "identifiers", *root, "88.100.1")
    assert "88.100.1/CLI-1" in text.splitlines()
    code, text = idis("delete", *root, "88.100.1/CLI-1")
    assert code == 0 and "was version 2" in text
    code, _ = idis("delete", *root, "88.100.1/CLI-1")
    assert code == EXIT_NOT_FOUND and "NOT_FOUND" in capsys.readouterr().err


def test_register_refuses_bad_input_with_a_clear_message(
    hierarchy: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ("--root", hierarchy.address("top-level"))
    assert idis("register", *root, "88.100.1/", "--value", "URL=x")[0] == EXIT_INVALID
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert idis("register", *root, "88.100.1/X", "--value", "no-equals-sign")[0] == EXIT_INVALID
    assert "is not [INDEX:]TYPE=DATA" in capsys.readouterr().err
    assert idis("register", *root, "88.100.3/X", "--value", "URL=x")[0] == EXIT_FAILED
    assert "create it first" in capsys.readouterr().err


def test_batch_register_from_jsonl_and_csv(hierarchy: Cluster, tmp_path: Path) -> None:
    root = ("--root", hierarchy.address("top-level"))
    jsonl = tmp_path / "items.jsonl"
    lines = [
        {"identifier": f"88.100.1/J-{n}", "values": [{"type": "URL", "data": f"https://x/{n}"}]} for n in range(50)
    ]
    lines.append({"identifier": "88.100.2/J-X", "values": [{"type": "URL", "data": "u"}, {"index": 1, "type": "Y"}]})
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, text = idis("register", *root, "--file", str(jsonl), "--batch-size", "20", "--json")
    report = json.loads(text)
    assert code == EXIT_INVALID  # one item failed, for invalid input
    assert (report["created"], report["failed"]) == (50, 1)
    assert report["errors"][0]["identifier"] == "88.100.2/J-X"
    assert report["errors"][0]["status"] == "INVALID_ARGUMENT"

    csv_file = tmp_path / "items.csv"
    csv_file.write_text(
        "identifier,type,data,index\n88.100.2/C-1,URL,https://c/1,1\n88.100.2/C-1,EMAIL,c@x,2\n88.100.1/C-2,URL,u,\n"
    )
    code, text = idis("register", *root, "--file", str(csv_file))
    assert code == 0 and "created 2" in text
    code, text = idis("resolve", *root, "88.100.2/C-1", "--json")
    assert [v["type"] for v in json.loads(text)["values"]] == ["URL", "EMAIL"]


def test_prefix_commands(hierarchy: Cluster) -> None:
    root = ("--root", hierarchy.address("top-level"))
    code, text = idis("prefix", "create", *root, "88.100.7")
    assert (code, text.strip()) == (0, "hosted: 88.100.7")
    code, text = idis("prefix", "delegate", *root, "88.100.8", "--server", "127.0.0.1:9", "--ttl", "60")
    assert "delegated: 88.100.8 -> 127.0.0.1:9 (ttl 60s)" in text
    code, text = idis("prefix", "list", *root, "88.100", "--json")
    kinds = {p["prefix"]: p["kind"] for p in json.loads(text)}
    assert kinds == {
        "88.100": "hosted",
        "88.100.1": "delegated",
        "88.100.2": "hosted",
        "88.100.7": "hosted",
        "88.100.8": "delegated",
    }
    code, text = idis("prefix", "list", *root, "88.100", "--limit", "2", "--json")
    assert (code, [p["prefix"] for p in json.loads(text)]) == (0, ["88.100", "88.100.1"])
    assert idis("prefix", "remove", *root, "88.100.8") == (0, "removed: 88.100.8 (was delegated)\n")
    assert idis("prefix", "remove", *root, "88.100.8")[0] == EXIT_NOT_FOUND
    assert idis("prefix", "remove", *root, "88.100.2")[0] == EXIT_FAILED  # it hosts identifiers
    assert idis("prefix", "remove", *root, "88..1")[0] == EXIT_INVALID


def test_the_local_hierarchy_command_starts_wires_seeds_and_stops(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "nodes.hierarchy", "--state-dir", str(tmp_path), "--base-port", "0"]
    # The second start on the same state must be idempotent: same seed, same delegations, no errors.
    for _start in range(2):
        result = subprocess.run(
            [*command, "--exit-after-start"], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr
        assert "Local identifier hierarchy is up" in result.stdout
    endpoints = json.loads((tmp_path / "endpoints.json").read_text())
    assert set(endpoints) == {"top-level", "secondary-100", "enterprise-1"}
    for node in endpoints.values():
        assert node["grpc"].startswith("127.0.0.1:") and node["https"].startswith("https://127.0.0.1:")
        assert node["handle"].startswith("127.0.0.1:")  # the Handle protocol, UDP and TCP
    for identity in ("88_ADMIN", "88.100_ADMIN", "88.100.1_ADMIN"):
        secret = tmp_path / "keys" / f"{identity}.secret"
        assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_text().strip()) >= 24
    assert sorted(p.name for p in tmp_path.glob("*.sqlite3")) == [
        "enterprise-1.sqlite3",
        "secondary-100.sqlite3",
        "top-level.sqlite3",
    ]


def run_idis(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a separate process, exactly as a script runs it."""
    return subprocess.run(
        [sys.executable, "-m", "resolver.cli", *argv], capture_output=True, text=True, timeout=60, check=False, env=env
    )


def closed_port() -> tuple[socket.socket, str]:
    """An address nothing listens on (bound, so nothing else takes it, but not listening)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


def test_version() -> None:
    result = run_idis("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"idis {metadata.version('idis')}")


def every_parser() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The top-level parser and every subcommand's, with its command line."""
    pending = [("idis", build_parser())]
    while pending:
        name, parser = pending.pop()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += [(f"{name} {sub}", p) for sub, p in action.choices.items()]


def test_help_is_plain_text_and_documents_environment_and_exit_statuses() -> None:
    read = set()
    for path in Path("resolver").glob("*.py"):
        read |= set(re.findall(r"environ\.get\(\"(IDIS_\w+)\"", path.read_text(encoding="utf-8")))
    assert read >= {"IDIS_ROOT", "IDIS_CA", "IDIS_CERT", "IDIS_CERT_KEY", "IDIS_IDENTITY", "IDIS_KEY"}
    assert {name for name, _ in ENVIRONMENT} == read
    readme = Path("README.md").read_text(encoding="utf-8")
    for command, parser in every_parser():
        text = parser.format_help()
        assert not set(text) & set("`*"), command  # no markup characters
        for name in read:
            assert f"  {name} " in text, (command, name)
            assert f"| `{name}` |" in readme, name
        for code, meaning in EXIT_CODES:
            assert f"  {code}  {meaning}" in text, (command, code)
            assert f"| {code} | {meaning} |" in readme, code
        if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            assert "--json" in text, command  # every command answers in JSON on request


def test_exit_statuses_tell_failures_apart(hierarchy: Cluster, tmp_path: Path) -> None:
    root = ("--root", hierarchy.address("top-level"))
    assert idis("resolve", *root, "88.100.1/SN-0001")[0] == 0
    assert idis("resolve", *root, "88.100.1/NOPE")[0] == EXIT_NOT_FOUND
    assert idis("resolve", *root, "88.100.1/SN-0001", "88.100.1/NOPE")[0] == EXIT_NOT_FOUND
    assert idis("resolve", *root, "88.100.1/SN-0001", "88.100.1/NOPE", "bad id")[0] == EXIT_FAILED  # mixed
    assert idis("resolve", *root, "no-slash")[0] == EXIT_INVALID
    assert idis("register", *root, "88.100.1/X", "--file", str(tmp_path / "missing.jsonl"))[0] == EXIT_INVALID
    assert idis("register", *root, "88.100.1/SN-0001", "--value", "URL=other")[0] == EXIT_FAILED  # ALREADY_EXISTS
    sock, nowhere = closed_port()
    with sock:
        assert idis("resolve", "--root", nowhere, "--timeout", "2", "88.100.1/SN-0001")[0] == EXIT_UNAVAILABLE
        assert idis("health", nowhere)[0] == EXIT_UNAVAILABLE
    # Usage errors, as a script sees them: argparse's and the command's own.
    assert run_idis("resolve").returncode == EXIT_USAGE
    assert run_idis("resolve", "--no-such-option", "88.100.1/X").returncode == EXIT_USAGE
    conflicting = run_idis("register", *root, "88.100.1/X")  # neither --value nor --file
    assert conflicting.returncode == EXIT_USAGE and "--value" in conflicting.stderr
    unsigned = run_idis("delete", *root, "--identity", "88.100.1/ADMIN", "88.100.1/X")  # an identity without a key
    assert unsigned.returncode == EXIT_USAGE and "--key" in unsigned.stderr


def test_exit_status_for_a_refused_write(cluster: Cluster, tmp_path: Path) -> None:
    assert idis("keygen", "88.7/ADMIN", "--out", str(tmp_path / "admin.pem"))[0] == 0
    trusted = base64.b64encode((tmp_path / "admin.pub").read_bytes()).decode()
    auth = {"mode": "required", "trust": [f"88.7/ADMIN={trusted}"]}
    address = cluster.start(NodeSpec("signed", "enterprise", "88.7", 0, extra={"auth": auth}))
    node = ("--node", address, "--root", address)
    assert idis("register", *node, "88.7/X", "--value", "URL=u")[0] == EXIT_DENIED  # unsigned
    assert idis("keygen", "88.7/OTHER", "--out", str(tmp_path / "other.pem"))[0] == 0
    stranger = ("--identity", "88.7/OTHER", "--key", str(tmp_path / "other.pem"))
    assert idis("register", *node, *stranger, "88.7/X", "--value", "URL=u")[0] == EXIT_DENIED  # unknown key
    admin = ("--identity", "88.7/ADMIN", "--key", str(tmp_path / "admin.pem"))
    assert idis("register", *node, *admin, "88.7/X", "--value", "URL=u")[0] == 0


def test_every_command_answers_in_json(hierarchy: Cluster, tmp_path: Path) -> None:
    root = ("--root", hierarchy.address("top-level"), "--json")

    def doc(*argv: str, expect: int = 0) -> Any:
        code, text = idis(*argv)
        assert code == expect, (argv, text)
        return json.loads(text)

    assert doc("resolve", *root, "88.100.1/SN-0001")["identifier"] == "88.100.1/SN-0001"
    assert [d["identifier"] for d in doc("resolve", *root, "88.100.1/SN-0001", "88.100.1/SN-0002")] == [
        "88.100.1/SN-0001",
        "88.100.1/SN-0002",
    ]
    assert doc("register", *root, "88.100.1/J-1", "--value", "URL=u")["created"] is True
    assert doc("delete", *root, "88.100.1/J-1") == {"identifier": "88.100.1/J-1", "deleted": True, "version": 1}
    assert doc("delete", *root, "88.100.1/J-1", expect=EXIT_NOT_FOUND)["error"]["status"] == "NOT_FOUND"
    assert doc("prefix", "create", *root, "88.100.5")["kind"] == "hosted"
    delegated = doc("prefix", "delegate", *root, "88.100.6", "--server", "127.0.0.1:9", "--ttl", "60")
    assert (delegated["prefix"], delegated["servers"], delegated["ttl"]) == ("88.100.6", ["127.0.0.1:9"], 60)
    assert "88.100.6" in {p["prefix"] for p in doc("prefix", "list", *root, "88.100")}
    assert doc("prefix", "remove", *root, "88.100.6")["kind"] == "delegated"
    assert doc("prefix", "remove", *root, "88.100.6", expect=EXIT_NOT_FOUND)["error"]["status"] == "NOT_FOUND"
    assert doc("prefix", "identifiers", *root, "88.100.2") == ["88.100.2/PART-0001"]
    audit = doc("audit", *root, "--prefix", "88.100")
    assert {"CreatePrefix", "DelegatePrefix"} <= {e["method"] for e in audit}
    key = doc("keygen", "88.100.1/OPS", "--out", str(tmp_path / "ops.pem"), "--json")
    assert key["public_key"] == str(tmp_path / "ops.pub") and key["trust"].startswith("88.100.1/OPS=")
    assert doc("keygen", "88.100.1/OPS", "--out", str(tmp_path / "ops.pem"), "--json", expect=EXIT_FAILED)["error"]
    health = doc("health", hierarchy.address("enterprise-1"), "--json")
    assert health["status"] == "SERVING"


def test_ca_from_the_command_line_with_a_client_certificate_from_the_environment(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = cluster.state / "tls"
    ca, ca_key = ensure_ca(tls)
    cert, key = issue(tls, "mutual", ca, ca_key)
    mutual = {"mode": "required", "cert": str(cert), "key": str(key), "ca": str(ca), "require_client_cert": True}
    address = cluster.start(NodeSpec("mutual", "enterprise", "88.9", 0, extra={"tls": mutual}))
    client_cert, client_key = issue(tls, "client", ca, ca_key)
    for name in ("IDIS_CA", "IDIS_CERT", "IDIS_CERT_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert idis("health", address, "--ca", str(ca))[0] == EXIT_UNAVAILABLE  # no client certificate
    monkeypatch.setenv("IDIS_CERT", str(client_cert))
    monkeypatch.setenv("IDIS_CERT_KEY", str(client_key))
    assert idis("health", address, "--ca", str(ca)) == (0, f"{address}: SERVING\n")
    assert idis("register", "--node", address, "--root", address, "--ca", str(ca), "88.9/M", "-v", "URL=u")[0] == 0
    assert idis("resolve", "--root", address, "--ca", str(ca), "88.9/M")[0] == 0
    monkeypatch.delenv("IDIS_CERT_KEY")
    assert idis("health", address, "--ca", str(ca))[0] == EXIT_USAGE  # a certificate without its key
    monkeypatch.setenv("IDIS_CA", str(ca))  # the same, all from the environment, and options over it
    assert idis("health", address, "--cert-key", str(client_key))[0] == 0


def test_template_commands_publish_show_list_and_check_files(hierarchy: Cluster, tmp_path: Path) -> None:
    """idis template: publish from a JSON file, show, list, validate a registration file offline
    (every fault with its line), and a batch registration from a file that names the template
    reports every refused item with its line and faults."""
    root = ("--root", hierarchy.address("top-level"))
    definition = {"prefix": "88.100", **json.loads(AUTOMOTIVE_PART.to_json())}
    (tmp_path / "part.json").write_text(json.dumps(definition))
    code, text = idis("template", "create", *root, str(tmp_path / "part.json"))
    assert code == 0 and text.strip() == "published: 88.100/TEMPLATE.auto-part.v2", text
    code, text = idis("template", "create", *root, str(tmp_path / "part.json"))
    assert code == 0 and "already published (identical)" in text
    code, text = idis("template", "show", *root, "88.100/TEMPLATE.auto-part.v2", "--json")
    assert code == 0 and json.loads(text)["items"][0]["name"] == "partNumber"
    code, text = idis("template", "list", *root, "88.100", "--json")
    assert code == 0 and json.loads(text) == ["88.100/TEMPLATE.auto-part.v2"]

    def line(n: int, **changes: str) -> str:
        items = {
            "partNumber": f"BRK-{n:05d}",
            "partName": "Brake disc",
            "productionDate": "2026-11-30",
            "manufacturer": "Hubei Parts Co.",
            **changes,
        }
        values = [{"index": i + 1, "type": t, "data": d} for i, (t, d) in enumerate(items.items())]
        values.append({"index": 90, "type": "TEMPLATE", "data": "88.100/TEMPLATE.auto-part.v2"})
        return json.dumps({"identifier": f"88.100.2/T-{n}", "values": values})

    rows = [line(1), line(2, material="wood"), line(3), line(4, productionDate="2026-02-30", weightKg="x")]
    (tmp_path / "parts.jsonl").write_text("\n".join(rows) + "\n")
    code, text = idis(
        "template", "validate", *root, str(tmp_path / "parts.jsonl"), "--template", str(tmp_path / "part.json")
    )
    assert code == EXIT_INVALID, text
    assert "line 2: 88.100.2/T-2: material: 'wood' is not one of" in text
    assert "line 4: 88.100.2/T-4: weightKg: 'x' is not a number" in text
    assert "line 4: 88.100.2/T-4: productionDate:" in text
    assert "2 of 4 items follow 88.100/TEMPLATE.auto-part.v2; 2 do not" in text
    code, text = idis("register", *root, "--file", str(tmp_path / "parts.jsonl"))
    assert code == EXIT_INVALID, text
    assert "created 2, already existed (identical) 0, failed 2" in text
    assert "  line 2: 88.100.2/T-2: INVALID_ARGUMENT:" in text and "      material: 'wood' is not one of" in text
    assert "      weightKg: 'x' is not a number" in text
