"""The proofs a signing node's answers carry (verifiable resolution): for a record, its batch's
statement, its leaf's inclusion path, the chain of delegations and its private digest (or salt);
for NOT_FOUND, a denial signed online; for a referral, the delegations down to the child.

The stored trees of the batches answered from are kept in memory (the most recently used
``max_trees``), each read again once its statement is past half its life, or once the process
that re-signs replaced it (``forget``; other worker processes: past half its life, and their
cached answers are invalidated through the change log like any write's).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from nodes.storage import AttestationRow, RecordRow, Store
from nodes.trust.attester import Attester
from resolver.attestation import Proof, ZoneKey
from resolver.errors import NotFound
from resolver.wire import denial_bytes, proof_field


class Proofs:
    def __init__(self, store: Store, attester: Attester, max_trees: int = 512) -> None:
        self.store = store
        self.attester = attester
        self.max_trees = max_trees
        self._trees: OrderedDict[int, AttestationRow] = OrderedDict()

    def _fresh(self, row: AttestationRow) -> bool:
        """True while a remembered tree's statement is in the first half of its life and signed
        by the key its prefix signs with (a roll makes the process that re-signs replace it)."""
        t = row.signed
        return t.expires - self.attester.now() > self.attester.lifetime // 2 and (
            t.kid == self.attester.signing_key(t.prefix).kid
        )

    def forget(self, ids: Sequence[int]) -> None:
        """Forgets remembered trees (replaced in the store: re-signed or rebuilt)."""
        for tree_id in ids:
            self._trees.pop(tree_id, None)

    async def trees(self, ids: Sequence[int]) -> dict[int, AttestationRow]:
        """The stored trees ``ids``, from memory when fresh there, else from the store."""
        found: dict[int, AttestationRow] = {}
        wanted: list[int] = []
        for tree_id in dict.fromkeys(ids):
            row = self._trees.get(tree_id)
            if row is not None and self._fresh(row):
                self._trees.move_to_end(tree_id)
                found[tree_id] = row
            else:
                wanted.append(tree_id)
        for start in range(0, len(wanted), 500):
            for tree_id, row in (await self.store.attestations(wanted[start : start + 500])).items():
                found[tree_id] = self._trees[tree_id] = row
        while len(self._trees) > self.max_trees:
            self._trees.popitem(last=False)
        return found

    async def of_rows(self, rows: Sequence[RecordRow], everything: Sequence[bool]) -> list[Proof | None]:
        """The proof of each stored row (None for a record written unsigned), for a reader
        shown every value of it (``everything``) or its public values only."""
        trees = await self.trees([r.attestation for r in rows if r.attestation is not None])
        proofs: list[Proof | None] = []
        for row, all_values in zip(rows, everything, strict=True):
            tree = trees.get(row.attestation) if row.attestation is not None else None
            if tree is None:
                proofs.append(None)
                continue
            t = tree.signed
            proofs.append(
                self.attester.proof(
                    t.prefix, t.statement, t.tree, t.size, row.leaf, row.key, row.version, row.record, all_values
                )
            )
        return proofs

    async def anonymous_fields(self, rows: Sequence[RecordRow]) -> list[bytes]:
        """For each row, the proof an anonymous reader gets as bytes to append to its
        ResolveResponse (b"" for a record written unsigned)."""
        proofs = await self.of_rows(rows, [False] * len(rows))
        return [proof_field(p) if p is not None else b"" for p in proofs]

    def deny(self, error: NotFound, prefix: str, identifier: str) -> NotFound:
        """``error`` with the signed denial of ``identifier`` by ``prefix`` (the hosted prefix
        covering it), valid for the negative TTL; unsigned beyond the node's rate of denials."""
        signed = self.attester.denial(prefix, identifier, error.negative_ttl)
        if signed is not None:
            error.denial = denial_bytes(*signed)
        return error

    def referral_delegations(self, child: str, keys: Sequence[ZoneKey]) -> tuple[str, ...]:
        return tuple(self.attester.referral_chain(child, keys))
