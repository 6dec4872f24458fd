"""The idis CLI as a user runs it, against the real local hierarchy."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from resolver.cli import main
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
    assert code == 1
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
    assert code == 1 and "NOT_FOUND" in capsys.readouterr().err


def test_register_refuses_bad_input_with_a_clear_message(
    hierarchy: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ("--root", hierarchy.address("top-level"))
    assert idis("register", *root, "88.100.1/", "--value", "URL=x")[0] == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert idis("register", *root, "88.100.1/X", "--value", "no-equals-sign")[0] == 1
    assert "is not [INDEX:]TYPE=DATA" in capsys.readouterr().err
    assert idis("register", *root, "88.100.3/X", "--value", "URL=x")[0] == 1
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
    assert code == 1  # one item failed
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
    assert sorted(p.name for p in tmp_path.glob("*.sqlite3")) == [
        "enterprise-1.sqlite3",
        "secondary-100.sqlite3",
        "top-level.sqlite3",
    ]
