"""The audit trail: bounded, unambiguous rows; refusals buffered, rate-limited and summarised;
retention in bounded steps; listings that cut rows recorded before the bounds."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from nodes.config import ConfigError, parse_config
from nodes.storage.sqlite import SqliteStore
from nodes.trust.audit import (
    CUT_MARK,
    FIELD_BYTES,
    Actor,
    AuditRow,
    BatchAudit,
    Caller,
    RefusalTrail,
    audit_row,
    batch_audit,
    bounded,
    prefix_of_target,
    refusal_row,
)
from resolver.identifier import Identifier, parse_identifier
from tests.engines import Opener

LOOK_ALIKE = "88.100.1/\u0410DMIN"  # a Cyrillic A


def row(target: str = "88.100.1/X", at: float = 1000.0, identity: str = "-", detail: str = "refused") -> AuditRow:
    return AuditRow(at, identity, 0, "ipv4:10.0.0.1:5000", "Create", target, prefix_of_target(target), "X", detail)


def test_every_field_is_shown_unambiguously_and_cut_to_its_bound() -> None:
    huge = "88.100.1/" + "x" * (1024 * 1024)
    cut = bounded(AuditRow(1.0, LOOK_ALIKE, 2**40, "p" * 500, "Create", huge, "88.100.1", "UNAUTHENTICATED", huge))
    assert cut.identity == "88.100.1/\\u0410DMIN"
    assert cut.key_index == 0  # not a key index
    for name, limit in FIELD_BYTES.items():
        assert len(getattr(cut, name).encode()) <= limit, name
    assert cut.target.endswith(CUT_MARK) and cut.detail.endswith(CUT_MARK) and cut.peer.endswith(CUT_MARK)
    assert bounded(cut) == cut
    # An identifier of 255 bytes fits whole however it is escaped (here: 127 two-byte letters).
    longest = "88.1/" + "\u0410" * 125
    assert bounded(row(target=longest)).target == "88.1/" + "\\u0410" * 125


def test_an_unverified_claim_is_recorded_as_a_claim() -> None:
    refused = refusal_row(
        1.0, None, LOOK_ALIKE + "x" * 5000, 300, "ipv4:10.0.0.1:5", "Create", "88.100.1/T", "UNAUTHENTICATED", "no sig"
    )
    assert refused.identity == "-" and refused.key_index == 0
    assert refused.detail.startswith('claimed "88.100.1/\\u0410DMIN') and refused.detail.endswith(
        "(not verified): no sig"
    )
    assert len(refused.detail) < 400
    verified = refusal_row(1.0, "88.100.1/OPS", "88.100.1/OPS", 300, "p", "Delete", "88.100.1/T", "DENIED", "no")
    assert (verified.identity, verified.key_index, verified.detail, verified.prefix) == (
        "88.100.1/OPS",
        300,
        "no",
        "88.100.1",
    )


@pytest.mark.parametrize(
    ("target", "prefix"),
    [
        ("88.100.1/X", "88.100.1"),
        ("88.100.7", "88.100.7"),
        ("88.100.1/" + "x" * 5000, "88.100.1"),  # too long to be an identifier, still under 88.100.1
        ("not a prefix/x", ""),
        ("x" * 5000, ""),
        ("?", ""),
    ],
)
def test_a_refusal_is_filed_under_a_valid_prefix_or_none(target: str, prefix: str) -> None:
    assert prefix_of_target(target) == prefix


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Trail:
    """A RefusalTrail writing into a list, one entry per transaction."""

    def __init__(self, **kwargs: object) -> None:
        self.transactions: list[list[AuditRow]] = []
        self.clock = Clock()
        self.trail = RefusalTrail(self.write, clock=self.clock, monotonic=self.clock, **kwargs)  # type: ignore[arg-type]

    async def write(self, rows: Sequence[AuditRow]) -> None:
        self.transactions.append(list(rows))


async def test_refusals_are_written_in_one_transaction_per_flush() -> None:
    t = Trail(peer_rate=1000, peer_burst=1000)
    for n in range(12):
        t.trail.add(row(f"88.100.1/N-{n}"), "10.0.0.1")
    assert t.transactions == []  # nothing waits for the disk
    assert await t.trail.flush() == 12
    assert len(t.transactions) == 1 and len(t.transactions[0]) == 12
    assert await t.trail.flush() == 0 and len(t.transactions) == 1


async def test_refusals_beyond_a_peers_rate_are_counted_in_one_summary_row_per_prefix() -> None:
    t = Trail(peer_rate=1, peer_burst=3)
    for n in range(10):
        t.trail.add(row(f"88.100.1/N-{n}"), "10.0.0.1")
    t.trail.add(row("88.100.2/B"), "10.0.0.2")
    t.trail.add(row("88.100.2/C"), "10.0.0.1")
    await t.trail.flush()
    (written,) = t.transactions
    one_by_one = [r for r in written if r.method == "Create"]
    assert [r.target for r in one_by_one] == ["88.100.1/N-0", "88.100.1/N-1", "88.100.1/N-2", "88.100.2/B"]
    summaries = {r.prefix: r for r in written if r.result == "NOT_RECORDED"}
    assert set(summaries) == {"88.100.1", "88.100.2"}
    assert summaries["88.100.1"].detail.startswith("7 more refused calls not recorded one by one")
    assert summaries["88.100.1"].detail.endswith(": 10.0.0.1 7")
    assert summaries["88.100.2"].detail.endswith(": 10.0.0.1 1")
    assert t.trail.dropped_total == 8
    t.clock.now += 1  # one token back
    t.trail.add(row("88.100.1/LATER"), "10.0.0.1")
    await t.trail.flush()
    assert [r.target for r in t.transactions[1]] == ["88.100.1/LATER"]


async def test_the_buffer_is_bounded_and_summaries_too() -> None:
    t = Trail(capacity=5, peer_rate=0, max_summaries=2)
    for n in range(50):
        t.trail.add(row(f"88.{n}/X"), f"10.0.0.{n}")
    assert t.trail.pending() == 5
    await t.trail.flush()
    summaries = [r for r in t.transactions[0] if r.result == "NOT_RECORDED"]
    assert [r.prefix for r in summaries] == ["88.5", "88.6", ""]  # the rest under "(other prefixes)"
    assert summaries[2].target == "(other prefixes)" and summaries[2].detail.startswith("43 more")
    assert "(other peers) 38" in summaries[2].detail and all(len(r.detail) <= 1024 for r in summaries)


async def test_a_trail_that_cannot_be_written_drops_the_rows_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(rows: Sequence[AuditRow]) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    trail = RefusalTrail(broken)
    trail.add(row(), "10.0.0.1")
    with caplog.at_level(logging.ERROR, logger="idis.audit"):
        assert await trail.flush() == 0
    assert "could not record 1 refused calls" in caplog.text and trail.pending() == 0


async def test_pruning_steps_follow_each_other_until_within_bounds_then_wait() -> None:
    clock = Clock()
    removed = [10, 10, 3, 10]
    calls: list[float] = []

    async def prune(now: float) -> int:
        calls.append(now)
        return removed.pop(0)

    async def write(rows: Sequence[AuditRow]) -> None:
        return None

    trail = RefusalTrail(write, prune=prune, prune_step=10, prune_interval=60, clock=clock, monotonic=clock)
    assert [await trail.prune_due() for _ in range(4)] == [10, 10, 3, 0]  # a short step: done for now
    clock.now += 60
    assert await trail.prune_due() == 10 and len(calls) == 4


async def test_the_store_prunes_by_age_and_by_count_in_bounded_steps(open_store: Opener) -> None:
    store = await open_store()
    try:
        await store.record_audit([row(f"88.1/{n}", at=1000 + n) for n in range(25)])
        assert await store.prune_audit(before=1010, max_rows=0, step=4) == 4  # the 4 oldest
        assert await store.prune_audit(before=1010, max_rows=0, step=100) == 6  # the rest older than 1010
        assert await store.prune_audit(before=1010, max_rows=0, step=100) == 0
        assert await store.prune_audit(before=0, max_rows=10, step=3) == 3  # beyond the newest 10
        assert await store.prune_audit(before=0, max_rows=10, step=100) == 2
        listed = await store.list_audit("88.1", limit=100)
        assert [r.target for _, r in listed] == [f"88.1/{n}" for n in range(15, 25)]
        assert await store.prune_audit(before=0, max_rows=0, step=100) == 0  # no retention: keeps all
    finally:
        await store.close()


async def test_rows_recorded_before_the_bounds_are_cut_when_listed(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "n.sqlite3")
    await store.close()
    huge = "88.100.1/" + "x" * (1024 * 1024)
    with sqlite3.connect(tmp_path / "n.sqlite3") as db:  # as the code before the bounds wrote them
        for _ in range(12):
            db.execute(
                "INSERT INTO audit (at, identity, key_index, peer, method, target, prefix, result, detail)"
                " VALUES (1, ?, 0, 'p', 'Create', ?, '88.100.1', 'UNAUTHENTICATED', ?)",
                (LOOK_ALIKE, huge, huge),
            )
    store = await SqliteStore.open(tmp_path / "n.sqlite3")
    try:
        listed = await store.list_audit("88.100.1", limit=10)
        assert len(listed) == 10
        for _, r in listed:
            assert r.identity == "88.100.1/\\u0410DMIN" and len(r.target) <= 800 and len(r.detail) <= 1024
        await store.record_audit([row(huge, identity=LOOK_ALIKE)])  # recorded cut and shown
        with sqlite3.connect(tmp_path / "n.sqlite3") as db:
            target, identity = db.execute("SELECT target, identity FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        assert len(target) <= 800 and identity == "88.100.1/\\u0410DMIN"
    finally:
        await store.close()


BASE: dict[str, Any] = {"authority": {"apexes": ["88"]}, "auth": {"mode": "off"}, "tls": {"mode": "off"}}


def test_audit_settings_have_bounded_defaults(tmp_path: Path) -> None:
    audit = parse_config(BASE, tmp_path).audit
    assert (audit.retention_days, audit.max_rows, audit.prune_step) == (365.0, 10_000_000, 1000)
    assert (audit.refusals_per_peer_per_second, audit.refusal_burst, audit.refusal_buffer) == (5.0, 20.0, 1000)
    assert audit.flush_interval == 1.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("flush_interval", 0, "audit.flush_interval: must be more than 0 and at most 3600 seconds"),
        ("max_rows", -1, "audit.max_rows: must not be negative"),
        ("refusal_buffer", 0, "audit.refusal_buffer: must be in 1..100000"),
        ("retention", 30, "audit.retention: unknown key"),
    ],
)
def test_bad_audit_settings_name_the_key(tmp_path: Path, key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({**BASE, "audit": {key: value}}, tmp_path)


def batch_of(actor: Actor | None, targets: list[Identifier], detail: str, at: float) -> BatchAudit:
    return batch_audit(actor, [str(t) for t in targets], [t.prefix.key for t in targets], detail, at)


@pytest.mark.parametrize(
    "texts",
    [
        ("88.100.1/A", "88.100.1/\u0410\u0411", "88.100.1/" + "x" * 240),  # one to show
        ("88.100.1/A", "88.100.a/B", "88.100.1/" + "x" * 100),  # each as it is: taken whole
        ("88.100.1/A", "88.100.1/back\\slash"),  # a backslash is shown doubled
        ("88.100.1/\u00e9",),  # one accented letter: shown escaped
    ],
)
def test_a_batchs_audit_rows_are_each_items_own_row_bounded(texts: tuple[str, ...]) -> None:
    actor = Actor(Caller(parse_identifier("88.100.1/ADMIN"), 300), "ipv4:127.0.0.1:5", "BatchCreate")
    targets = [parse_identifier(t) for t in texts]
    expected = [bounded(audit_row(actor, t, "created v1 (batch)", 1_800_000_000)) for t in targets]
    batch = batch_of(actor, targets, "created v1 (batch)", 1_800_000_000)
    assert batch.rows() == expected
    assert batch.only([len(texts) - 1, 0]).rows() == [expected[-1], expected[0]]
    assert batch_of(None, targets[:1], "d", 1.0).rows() == [bounded(audit_row(None, targets[0], "d", 1.0))]
    assert batch_of(actor, [], "d", 1.0).rows() == []
