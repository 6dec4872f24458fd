"""What the store holds, engine by engine the same: prefix rows, record rows, signed trees, and
how identifier keys order (a prefix's identifiers are one key range)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nodes.trust.attester import SignedTree
from resolver.errors import Unavailable


@dataclass(frozen=True, slots=True)
class PrefixRow:
    key: str
    display: str
    kind: int
    site: bytes | None
    ttl: int
    identifier_count: int
    admins: bytes | None = None
    """HS_ADMIN grants on the prefix (JSON list), see nodes.trust.permissions."""
    zone_keys: str | None = None
    """For a delegated prefix: the keys its node signs with (JSON list of key claims,
    ``resolver.attestation.ZoneKey.claim``), which the delegation this node signs lists."""


@dataclass(frozen=True, slots=True)
class RecordRow:
    key: str
    version: int
    record: bytes
    attestation: int | None = None
    """The signed batch (``attestations.id``) the record at this version belongs to, if any."""
    leaf: int = 0
    """The record's leaf in that batch's tree."""


@dataclass(frozen=True, slots=True)
class AttestationRow:
    """A write batch's signed tree as stored, under its id."""

    id: int
    signed: SignedTree


class StoreUnavailable(Unavailable):
    """The store cannot write now (the disk failed, the file went away, the database primary is
    unreachable...); the node retries by itself and its health says NOT_SERVING meanwhile."""


def prefix_of_key(key: str) -> str:
    return key[: key.index("/")]


def range_of_prefix(prefix_key: str) -> tuple[str, str]:
    """The half-open key range holding exactly the identifiers directly under ``prefix_key``
    (keys compare byte by byte: "0" is the character after "/")."""
    return prefix_key + "/", prefix_key + "0"


LargestPrefixes = tuple[list[tuple[str, int]], int, int]
"""The largest hosted prefixes with their identifier counts, how many other hosted prefixes
there are, and how many identifiers those hold (what the per-prefix metrics show)."""

LARGEST_PREFIXES = (
    "SELECT display, identifier_count FROM prefixes WHERE kind = 1 ORDER BY identifier_count DESC, display LIMIT ?"
)
HOSTED_TOTALS = "SELECT count(*), coalesce(sum(identifier_count), 0) FROM prefixes WHERE kind = 1"


def largest_of(largest: Sequence[Sequence[Any]], totals: Sequence[Any]) -> LargestPrefixes:
    """``LargestPrefixes`` from the rows of LARGEST_PREFIXES and the row of HOSTED_TOTALS."""
    shown = [(str(name), int(count)) for name, count in largest]
    return shown, int(totals[0]) - len(shown), int(totals[1]) - sum(count for _, count in shown)
