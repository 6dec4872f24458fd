from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodes.config import ConfigError, load_config, parse_config

GOOD: dict[str, Any] = {
    "node": {"name": "s", "role": "secondary", "listen": "127.0.0.1:7002"},
    "authority": {"apexes": ["88.100"]},
    "storage": {"path": "s.sqlite3"},
    "auth": {"trust": ["88.100/ADMIN=MCowBQYDK2VwAyEA+4AFy78SgIFM9u9MZA56fw0CateWL8RKPfeL2Km1Zqw="]},
    "tls": {"cert": "tls/node.pem", "key": "tls/node.key", "ca": "tls/ca.pem"},
}


def with_(section: str, **values: Any) -> dict[str, Any]:
    data = {k: dict(v) for k, v in GOOD.items()}
    data.setdefault(section, {}).update(values)
    return data


def test_a_good_config_parses_with_defaults(tmp_path: Path) -> None:
    config = parse_config(GOOD, base_dir=tmp_path)
    assert config.database_path == tmp_path / "s.sqlite3"
    assert [str(p) for p in config.apex_prefixes] == ["88.100"]
    assert config.limits.max_batch == 2000
    assert config.storage.synchronous == "full"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**GOOD, "nodes": {}}, "nodes: unknown section"),
        (with_("node", colour="red"), "node.colour: unknown key"),
        (with_("node", role="king"), "node.role: must be one of"),
        (with_("node", listen="7002"), "node.listen: expected host:port"),
        (with_("node", log_format="xml"), "node.log_format: must be text or json, got 'xml'"),
        (with_("authority", apexes=["88", "8 8"]), "authority.apexes[1]: prefix '8 8'"),
        (with_("authority", apexes="88"), "authority.apexes: expected a list"),
        (with_("authority", apexes=[]), "authority.apexes: a node with role 'secondary' needs"),
        (with_("storage", synchronous="sometimes"), "storage.synchronous: must be"),
        (with_("limits", max_batch=0), "limits.max_batch: must be positive"),
        (with_("limits", max_batch="2000"), "limits.max_batch: expected int, got str"),
        (with_("recursion", enabled=True), "recursion.roots: recursion is enabled"),
        (with_("recursion", roots=["nowhere"]), "recursion.roots[0]:"),
        (with_("recursion", max_hops=41), "recursion.max_hops: must be in 1..40"),
        (with_("auth", mode="maybe"), "auth.mode: must be required or off"),
        (with_("auth", trust=["88.100/ADMIN"]), "auth.trust[0]: expected IDENTITY=BASE64-DER"),
        (with_("auth", trust=["88.100/ADMIN=bm90IGEga2V5"]), "auth.trust[0]: HS_PUBKEY data is not a DER"),
        (with_("auth", trust=["88.100/ADMIN=file:missing.pem"]), "auth.trust[0]:"),
        (with_("auth", trust=[]), "auth.trust: signatures are required but no administrator is trusted"),
        (with_("tls", mode="sometimes"), "tls.mode: must be required or off"),
        (with_("tls", key=""), "tls.key: TLS is required but no key file is given"),
    ],
)
def test_bad_configs_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in str(info.value)


def test_load_config_reports_toml_errors_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_the_files_a_config_names_must_exist_at_start(tmp_path: Path) -> None:
    config = parse_config(GOOD, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"tls\.cert: .*tls/node\.pem does not exist"):
        config.check_files()
