"""What an authenticated caller may change: the Handle System's HS_ADMIN permission bits.

Grants come from three places, checked in this order:

1. HS_ADMIN values in the identifier's own record (for changes to an existing identifier);
2. HS_ADMIN grants on the identifier's prefix and on every prefix above it, up to the apex
   (set when a prefix is created or delegated);
3. the node's trust anchors (``[auth] trust``), which hold every right on the node's apexes.

A grant names an administrator identifier and the index of its HS_PUBKEY (0: any of its keys).
Violations raise PermissionDenied naming the missing permission; nothing is changed.

A grant to an identity that does not exist gives nothing: the callers checked here are those
``nodes.trust.authentication`` verified, whose signature verified with the identity's HS_PUBKEY,
read for that very call from this node's store when the identity is hosted here (from the
config for trust anchors; resolved, at most ``[auth] key_cache_ttl`` old, for other nodes'
identities). So no one can match a grant naming an identity that is not registered with a key,
and registering it means storing an HS_PUBKEY: admin data (``resolver.record.ADMIN_DATA_TYPES``),
which needs ADD_ADMIN, like adding a key to an existing identity (ADD_ADMIN), replacing it
(MODIFY_ADMIN) or removing it (REMOVE_ADMIN).

A stored HS_ADMIN value that cannot be read (written before values were validated) grants
nothing, so the record can still be repaired or deleted by whoever else administers it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from nodes.trust.audit import Caller
from nodes.trust.secret_keys import SECKEY_TYPE
from resolver.errors import PermissionDenied, Unauthenticated
from resolver.identifier import Prefix
from resolver.record import AdminGrant, AdminPermission, Record, grants_of


class Permissions:
    def __init__(
        self,
        prefix_grants: Callable[[Prefix], Sequence[AdminGrant]],
        apexes: Iterable[Prefix],
        anchors: Iterable[str],
        enforce: bool,
    ) -> None:
        """``prefix_grants``: the HS_ADMIN grants set on one prefix (the authority's table);
        ``apexes``: the node's apexes; ``anchors``: identifier keys that hold every right on them."""
        self.prefix_grants = prefix_grants
        self.apex_keys = frozenset(a.key for a in apexes)
        self.anchors = frozenset(anchors)
        self.enforce = enforce

    def holds(self, caller: Caller, needed: AdminPermission, prefix: Prefix, record: Record | None = None) -> bool:
        """Whether ``caller`` holds ``needed`` on ``record`` or on ``prefix`` (or above)."""
        key, index = caller.identity.key, caller.key_index
        if record is not None and any(
            g.allows(key, index, needed) for g in grants_of(record.values, skip_malformed=True)
        ):
            return True
        for level in prefix.ancestors():
            if any(g.allows(key, index, needed) for g in self.prefix_grants(level)):
                return True
            if level.key in self.apex_keys and key in self.anchors:
                return True
        return False

    def require(
        self, caller: Caller | None, needed: AdminPermission, prefix: Prefix, record: Record | None = None
    ) -> None:
        """Raises unless ``caller`` holds ``needed`` on ``record`` or on ``prefix`` (or above)."""
        if not self.enforce:
            return
        if caller is None:
            raise Unauthenticated("write calls must be signed")
        if self.holds(caller, needed, prefix, record):
            return
        names = "|".join(p.name or "" for p in AdminPermission if p & needed)
        target = f"identifier {record.identifier}" if record is not None else f"prefix {prefix}"
        raise PermissionDenied(f"{caller.identity} does not hold {names} on {target}")


def readable_part(record: Record, reader: Caller | None, permissions: Permissions | None) -> Record:
    """The record as ``reader`` may read it: every value when it holds READ_VALUE on the record
    (or its prefix), else the publicly readable values only (so also for anonymous readers and
    on a node that checks no permissions). Every answer carrying a record goes through here:
    resolution and the answers to writes alike. HS_SECKEY values (sealed secrets) are in no
    answer: their permissions allow no reading, and they are left out for READ_VALUE too."""
    if (
        reader is not None
        and permissions is not None
        and permissions.holds(reader, AdminPermission.READ_VALUE, record.identifier.prefix, record)
    ):
        if any(v.type == SECKEY_TYPE for v in record.values):  # sealed secrets are never served
            return replace(record, values=tuple(v for v in record.values if v.type != SECKEY_TYPE))
        return record
    return record.public_view()
