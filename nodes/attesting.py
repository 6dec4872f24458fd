"""A signing node's upkeep (verifiable resolution): fetching, checking and renewing the chain of
delegations down to each of its apexes from its parent, and re-signing stored trees before their
statements expire.

The chain of an apex below the trust anchor comes from the parent: the referral a parent gives
for the apex carries the delegations from the anchor down to it (``Referral.delegations``). The
node adopts it only when it verifies against the configured anchor and lists the key the node
signs the apex with (``Attester.set_upstream``): a parent (or anything on the way) cannot hand
it a chain that resolvers would refuse, nor one naming other keys. Until a chain is adopted,
the node's answers carry none, and validating resolvers refuse them.

Re-signing: a tree whose statement is in its last quarter is signed again when every record it
holds is still the one it names (the records still point at it); otherwise it is rebuilt with
the leaves of records changed or deleted since replaced by a leaf that proves nothing (every
record keeps its place), so an old version or a deleted record is not kept provable for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from nodes.storage import AttestationRow, RecordRow, Store, Transaction
from nodes.trust.attester import Attester, SignedTree
from resolver.attestation import RETIRED_LEAF, Bogus
from resolver.errors import IdisError
from resolver.identifier import parse_identifier
from resolver.resolver import Resolver
from resolver.site import Referral
from resolver.wire import decode_answer

log = logging.getLogger("idis.attesting")


async def _index_unsigned(tx: Transaction) -> None:
    await tx.index_unsigned()


RETRY = (1.0, 10.0)
"""Seconds between attempts to fetch a chain that failed: the first, doubling to the last."""
RESIGN_BATCH = 200
"""Trees re-signed per transaction."""


async def fetch_chain(resolver: Resolver, apex: str) -> list[str]:
    """The delegations the parent of ``apex`` serves with its referral to it (the resolver
    follows the referrals from the roots down to the apex's own site)."""
    prefix = parse_identifier(f"{apex}/0").prefix
    with contextlib.suppress(IdisError):  # the apex's own answer (this node's) is not what is wanted
        await resolver.authority_for(f"{apex}/0")
    data = resolver.cache.get(prefix.key.encode())
    if data is None:
        raise Bogus(f"no referral to {apex} was given on the way from the roots")
    referral = decode_answer(data)
    if not isinstance(referral, Referral):
        raise Bogus(f"the answer for {apex} is not a referral")
    return list(referral.delegations)


class Attesting:
    """The background work of a signing node."""

    def __init__(
        self,
        attester: Attester,
        store: Store,
        resolver: Resolver | None,
        on_chain: Callable[[], None],
        resign_interval: float,
        prefixes: Callable[[], list[str]] = list,
        on_records: Callable[[Sequence[str]], None] = lambda keys: None,
        forget_trees: Callable[[Sequence[int]], None] = lambda ids: None,
    ) -> None:
        """``on_chain`` is told when an adopted chain changes (cached answers carry the old one);
        ``prefixes``: the keys of the prefixes this node hosts (whose trees it re-signs);
        ``on_records`` is told the keys of records signed afresh (cached answers carry their old
        proofs, or none), ``forget_trees`` the ids of the stored trees replaced."""
        self.attester = attester
        self.store = store
        self.resolver = resolver
        self.on_chain = on_chain
        self.resign_interval = resign_interval
        self.prefixes = prefixes
        self.on_records = on_records
        self.forget_trees = forget_trees
        self._fetching = asyncio.Lock()
        """One chain fetched at a time: they share the resolver and its cache."""
        self.chain_errors: dict[str, str] = {}
        """Apex -> why its chain could not be adopted last time (for logs and tests)."""

    def tasks(self, resign: bool = True) -> list[asyncio.Task[None]]:
        """The background tasks: keeping each apex's chain, and (``resign``) re-signing."""
        tasks = [asyncio.create_task(self._resign_periodically(), name="attesting-resign")] if resign else []
        for apex in self.attester.apexes:
            if self.attester.needs_upstream(apex):
                tasks.append(asyncio.create_task(self._keep_chain(apex), name=f"attesting-chain {apex}"))
        return tasks

    async def refresh_chain(self, apex: str) -> int:
        """Fetches and adopts the chain of ``apex``; until when it holds (Bogus or another
        IdisError when it cannot)."""
        if self.resolver is None:
            raise Bogus(f"no roots are configured to fetch the chain of {apex} from ([signing] roots)")
        before = self.attester.chain(apex)
        async with self._fetching:
            self.resolver.cache.clear()  # a referral cached earlier carries an older chain
            delegations = await fetch_chain(self.resolver, apex)
        until = self.attester.set_upstream(apex, delegations)
        if self.attester.chain(apex) != before:
            self.on_chain()
        self.chain_errors.pop(apex, None)
        return until

    async def _keep_chain(self, apex: str) -> None:
        pause = RETRY[0]
        while True:
            try:
                until = await self.refresh_chain(apex)
                pause = RETRY[0]
                # Renewed at half of what is left, so a parent's re-signed delegation is picked
                # up well before the old one ends.
                await asyncio.sleep(max(RETRY[0], min(self.resign_interval, (until - self.attester.now()) / 2)))
                continue
            except Exception as exc:  # the task must outlive any failure: answers depend on it
                if self.chain_errors.get(apex) != str(exc):
                    log.warning("the chain of delegations down to %s cannot be adopted yet: %s", apex, exc)
                self.chain_errors[apex] = str(exc)
            await asyncio.sleep(pause)
            pause = min(2 * pause, RETRY[1])

    async def _resign_periodically(self) -> None:
        indexed = False
        while True:
            try:
                if not indexed:
                    await self.store.write(_index_unsigned)
                    indexed = True
                for prefix in self.prefixes():
                    await self.attest_unsigned(prefix)
                await self.resign_all_due()
            except Exception:  # the task must outlive any failure: statements expire without it
                log.exception("re-signing failed; trying again in %s s", self.resign_interval)
            await asyncio.sleep(self.resign_interval)

    async def resign_all_due(self) -> int:
        """``resign_due`` until nothing is due, or until a round finds only the trees the one
        before re-signed (their key ends before their statements would: a key to roll, which
        ``signing_key`` warns of); how many it re-signed."""
        done, previous = 0, None
        while True:
            ids = await self.resign_due()
            if not ids or ids == previous:
                return done
            done += len(ids)
            if len(ids) < RESIGN_BATCH:
                return done
            previous = ids

    async def attest_unsigned(self, prefix: str, batch: int = 2000) -> int:
        """Signs the records of ``prefix`` that belong to no tree (written before the node
        signed, or loaded offline), ``batch`` to a tree; how many it signed."""
        done, after = 0, ""
        while True:
            rows = await self.store.unattested(prefix, after, batch)
            if not rows:
                return done
            leaves = self.attester.leaves([r.key for r in rows], [r.version for r in rows], [r.record for r in rows])
            signed = self.attester.sign_tree(prefix, leaves)

            async def work(tx: Transaction, signed: SignedTree = signed, rows: list[RecordRow] = rows) -> None:
                await tx.attest_existing(signed, rows)

            keys = [r.key for r in rows]

            def then(_: None, keys: list[str] = keys) -> None:
                self.on_records(keys)

            await self.store.write(work, then=then)
            done += len(rows)
            after = rows[-1].key

    async def resign_due(self) -> set[int]:
        """Re-signs (or rebuilds) up to RESIGN_BATCH stored trees in their last quarter or signed
        by a key their prefix no longer signs with (after a roll); how many it did."""
        before = self.attester.now() + self.attester.lifetime // 4
        due = await self.store.expiring_attestations(before, RESIGN_BATCH)
        for prefix in self.prefixes():
            if len(due) >= RESIGN_BATCH:
                break
            kid = self.attester.signing_key(prefix).kid
            due += await self.store.attestations_signed_otherwise(prefix, kid, RESIGN_BATCH - len(due))
        due = list({row.id: row for row in due}.values())
        if not due:
            return set()
        plans = [await self._plan(row) for row in due]

        async def work(tx: Transaction) -> None:
            for row, (plan, keys) in zip(due, plans, strict=True):
                await self._apply(tx, row, plan, keys)

        def then(_: None) -> None:  # cached answers and trees carry the statements replaced
            self.forget_trees([row.id for row in due])
            self.on_records([key for _, keys in plans for key in keys])

        await self.store.write(work, then=then)
        return {row.id for row in due}

    async def _plan(self, row: AttestationRow) -> tuple[SignedTree | None, list[str]]:
        """What ``row`` becomes: None (no record points at it any more: dropped), or re-signed
        as it is, or rebuilt with the leaves of records no longer in it retired; and the keys of
        its records."""
        records = await self.store.attested_records(row.id)
        keys = [r.key for r in records]
        if not records:
            return None, keys
        t = row.signed
        if len(records) == t.size:
            return self.attester.resign(t.prefix, t.tree, t.size), keys
        leaves = [RETIRED_LEAF] * t.size
        current = self.attester.leaves(
            [r.key for r in records], [r.version for r in records], [r.record for r in records]
        )
        for record, leaf in zip(records, current, strict=True):
            if record.leaf < t.size:
                leaves[record.leaf] = leaf
        return self.attester.sign_tree(t.prefix, leaves), keys

    async def _apply(self, tx: Transaction, row: AttestationRow, plan: SignedTree | None, keys: list[str]) -> None:
        """Stores ``plan``, unless a record of the tree changed since it was made (its leaf in
        the plan would prove the old version): that tree waits for the next round."""
        if plan is None:
            await tx.drop_attestation(row.id)  # no record pointed at it: none ever will again
        elif await tx.still_pointing(row.id, keys) == len(keys):
            await tx.replace_attestation(row.id, plan)
            tx.touched(keys)  # their answers carry the tree's statement
