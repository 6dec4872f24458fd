"""Every acknowledged write survives SIGKILL of the node that took it."""

from __future__ import annotations

import asyncio
import signal

import pytest

from resolver.errors import NotFound
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver
from tests.engines import ENGINES
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.parametrize("store_engine", ENGINES)


async def test_acknowledged_writes_survive_sigkill(hierarchy: Cluster) -> None:
    enterprise = hierarchy.address("enterprise-1")
    registrar = Registrar(node=enterprise)
    acknowledged: dict[str, int] = {}
    try:
        singles = await asyncio.gather(
            *(registrar.create(f"88.100.1/D-{n:04d}", [Value(1, "URL", f"u{n}".encode())]) for n in range(100))
        )
        acknowledged.update({str(w.record.identifier): w.record.version for w in singles})
        batch = [(f"88.100.1/B-{n:04d}", [Value(1, "URL", f"b{n}".encode())]) for n in range(500)]
        outcomes = await registrar.batch_create(batch)
        acknowledged.update({o.identifier: o.version for o in outcomes if o.error is None})
        changed = await registrar.replace("88.100.1/D-0000", [Value(1, "URL", b"changed")])
        acknowledged["88.100.1/D-0000"] = changed.record.version
        await registrar.delete("88.100.1/D-0001")
        del acknowledged["88.100.1/D-0001"]
    finally:
        await registrar.close()
    assert len(acknowledged) == 599

    # No shutdown, no checkpoint: the process is killed straight after the last acknowledgement.
    assert hierarchy.kill("enterprise-1") == -signal.SIGKILL
    assert hierarchy.restart("enterprise-1") == enterprise

    async with Resolver([hierarchy.address("top-level")]) as resolver:
        for identifier, version in acknowledged.items():
            assert (await resolver.resolve(identifier)).version == version
        assert (await resolver.resolve("88.100.1/D-0000")).value(1).data == b"changed"  # type: ignore[union-attr]
        assert (await resolver.resolve("88.100.1/SN-0001")).version == 1  # the seed, too
        with pytest.raises(NotFound):  # a deleted identifier stays deleted
            await resolver.resolve("88.100.1/D-0001")


async def test_delegations_survive_sigkill_of_the_top_level_node(hierarchy: Cluster) -> None:
    top = hierarchy.address("top-level")
    hierarchy.kill("top-level")
    assert hierarchy.restart("top-level") == top
    async with Resolver([top]) as resolver:
        assert (await resolver.resolve("88.100.1/SN-0003")).version == 1
