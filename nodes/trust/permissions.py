"""What an authenticated caller may change: the Handle System's HS_ADMIN permission bits.

Grants come from three places, checked in this order:

1. HS_ADMIN values in the identifier's own record (for changes to an existing identifier);
2. HS_ADMIN grants on the identifier's prefix and on every prefix above it, up to the apex
   (set when a prefix is created or delegated);
3. the node's trust anchors (``[auth] trust``), which hold every right on the node's apexes.

A grant names an administrator identifier and the index of its HS_PUBKEY (0: any of its keys).
Violations raise PermissionDenied naming the missing permission; nothing is changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from nodes.trust.audit import Caller
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
        if record is not None and any(g.allows(key, index, needed) for g in grants_of(record.values)):
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
