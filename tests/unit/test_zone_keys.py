"""A node's prefix signing keys (nodes.trust.zone_keys): made when first needed, kept across
restarts readable by the owner only, rolled with an overlap during which records signed by
either key verify, then only the new one's."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nodes.trust.zone_keys import DAY, ZoneKeys
from resolver.attestation import (
    Bogus,
    Proof,
    TrustAnchor,
    ZoneKey,
    batch_attestation,
    delegation,
    merkle_tree,
    record_leaf,
    verify_record,
)
from resolver.errors import FailedPrecondition, InvalidIdentifier
from resolver.identifier import parse_identifier
from resolver.record import Record, Value

NOW = 1_800_000_000
SALT = bytes(16)


def test_the_first_key_is_made_once_and_kept_for_the_owner_only(tmp_path: Path) -> None:
    keys = ZoneKeys(tmp_path)
    first = keys.signing("88.100.a", NOW)
    assert first.kid == "k1" and first.valid(NOW) and not first.valid(NOW + 366 * DAY)
    again = ZoneKeys(tmp_path).signing("88.100.A", NOW + 60)  # another process, the prefix in another case
    assert again.kid == "k1" and again.public().jwk() == first.public().jwk()
    folder = tmp_path / "88.100.A"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    with pytest.raises(InvalidIdentifier):
        keys.signing("88..1", NOW)


def sign_and_verify(keys: ZoneKeys, parent: Ed25519PrivateKey, at: int, signed_at: int | None = None) -> None:
    """A record signed by the prefix's key of ``signed_at`` verified at ``at`` through the
    parent's delegation of the keys published at ``at``."""
    record = Record(parse_identifier("88.100.1/A"), (Value(1, "URL", b"u"),), 1)
    signer = keys.signing("88.100.1", at if signed_at is None else signed_at)
    root, [path] = merkle_tree([record_leaf(record, SALT)])
    statement = batch_attestation("88.100.1", signer.private, signer.kid, root, 1, at, DAY)
    published = keys.published("88.100.1", at)
    proof = Proof(statement, 0, path, [delegation("88.100", parent, "p", "88.100.1", published, at, DAY)], salt=SALT)
    anchor = TrustAnchor("88.100", (ZoneKey("p", parent.public_key()),))
    verify_record(anchor, "88.100.1/A", 1, record.values, proof, at)


def test_a_rolled_key_overlaps_the_old_then_the_old_ends(tmp_path: Path) -> None:
    keys, parent = ZoneKeys(tmp_path), Ed25519PrivateKey.generate()
    old = keys.signing("88.100.1", NOW)
    new = keys.roll("88.100.1", NOW + DAY, overlap=7 * DAY)
    assert new.kid == "k2" and keys.signing("88.100.1", NOW + DAY).kid == "k2"  # the new one signs
    assert [k.kid for k in keys.published("88.100.1", NOW + DAY)] == ["k1", "k2"]
    assert [k.kid for k in keys.published("88.100.1", NOW + 8 * DAY)] == ["k2"]
    sign_and_verify(keys, parent, NOW + 2 * DAY)
    # a record signed with the old key still verifies during the overlap...
    old_only = ZoneKeys(tmp_path / "copy")
    old_only._write("88.100.1", [k for k in keys.keys("88.100.1") if k.kid == old.kid])
    sign_and_verify(old_only, parent, NOW + 2 * DAY)
    # ...and not once it ended: the parent's delegation no longer lists it
    with pytest.raises(Bogus):
        sign_and_verify(old_only, parent, NOW + 8 * DAY, signed_at=NOW + 2 * DAY)


def test_a_key_revoked_ends_at_once(tmp_path: Path) -> None:
    keys = ZoneKeys(tmp_path)
    keys.signing("88.100.1", NOW)
    keys.roll("88.100.1", NOW + 60, overlap=0)
    assert [k.kid for k in keys.published("88.100.1", NOW + 60)] == ["k2"]


def test_unreadable_keys_are_named(tmp_path: Path) -> None:
    keys = ZoneKeys(tmp_path)
    keys.signing("88.100.1", NOW)
    (tmp_path / "88.100.1" / "keys.json").write_text("[{")
    with pytest.raises(FailedPrecondition, match=r"keys\.json"):
        keys.signing("88.100.1", NOW)
    (tmp_path / "88.100.1" / "keys.json").write_text('[{"kid": "k1", "nbf": 0, "exp": 9}]')
    (tmp_path / "88.100.1" / "k1.pem").write_text("not a key")
    with pytest.raises(FailedPrecondition, match=r"zone keys of 88\.100\.1"):
        keys.signing("88.100.1", NOW)


def test_the_operators_key_commands(tmp_path: Path) -> None:
    """``idis-keys`` as an operator runs it: show, anchor, roll, and a clear error."""
    import subprocess
    import sys

    from resolver.attestation import keys_from_json, load_anchor

    config = tmp_path / "node.toml"
    sections = (
        '[authority]\napexes = ["88.100.1"]',
        '[auth]\nmode = "off"',
        '[tls]\nmode = "off"',
        "[signing]\nenabled = true",
    )
    config.write_text("\n".join(sections) + "\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "nodes.key_admin", "--config", str(config), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    shown = run("show", "88.100.1")
    assert shown.returncode == 0, shown.stderr
    [first] = keys_from_json(shown.stdout)
    anchor_file = tmp_path / "anchor.json"
    anchor_file.write_text(run("anchor", "88.100.1").stdout)
    assert load_anchor(anchor_file).keys == (first,)
    rolled = run("roll", "88.100.1", "--overlap", "0")
    assert rolled.returncode == 0 and "signing with k2" in rolled.stderr
    assert [k.kid for k in keys_from_json(rolled.stdout)] == ["k2"]  # k1 revoked: ended now
    assert (tmp_path / "zone-keys" / "88.100.1" / "k1.pem").stat().st_mode & 0o077 == 0
    bad = run("show", "not a prefix")
    assert bad.returncode == 2 and bad.stderr.startswith("idis-keys: ")
