"""Which metadata template a registration must follow, and whether it does (``resolver.template``).

A registration that names a template (a ``TEMPLATE`` value) is checked against it on every write
path (gRPC, the HTTP API, batches item by item); a prefix listed in ``[templates] required``
(and every prefix below it) admits no registration that names none. A template is read where it
is stored: here, when this node hosts its prefix, or else through ``resolve`` (the hierarchy,
from the node's ``[auth] roots``), and kept: a published template version never changes (the
registry refuses to change or delete one), so what was read stays true.

The template a write needs is fetched before its transaction (``prefetch``), so that the
transaction itself only checks (``violation``) and holds the write lock no longer."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace

from nodes.authority import Authority
from nodes.trust.audit import Caller
from nodes.trust.permissions import readable_part
from nodes.trust.secret_keys import SECKEY_TYPE
from resolver.cache import TemplateCheck
from resolver.errors import IdisError, NotFound, TemplateViolation
from resolver.identifier import Identifier, Prefix
from resolver.record import Record
from resolver.template import (
    REFERENCE_TYPE,
    Fields,
    Template,
    Typed,
    applies_to,
    check_fields,
    exposed,
    fields_of,
    named_in,
    named_template,
    reference_of,
    template_in,
)
from resolver.wire import decode_record

log = logging.getLogger("idis.templates")

MAX_KEPT = 1000
"""Templates kept in memory at most (a node follows few; each is at most 64 KiB of JSON)."""
MAX_NAMED_PER_CALL = 16
"""Different templates one call (a batch) may name: each may cost a lookup in the hierarchy."""

Fetched = dict[str, Template | str]
"""The templates a call's registrations name, by key: the template, or why it was not read."""


class Templates:
    """The templates of one node's registrations."""

    def __init__(
        self,
        authority: Authority,
        required: Sequence[Prefix] = (),
        resolve: Callable[[Identifier], Awaitable[Record]] | None = None,
    ) -> None:
        self.authority = authority
        self.required = list(required)
        self.resolve = resolve
        self._kept: dict[str, Template] = {}
        self._checks: dict[str, tuple[Template, TemplateCheck]] = {}

    def requires(self, prefix: Prefix) -> bool:
        return any(prefix.key == p.key or prefix.key.startswith(p.key + ".") for p in self.required)

    async def template(self, identifier: Identifier) -> Template | None:
        """The template stored at ``identifier``, None when there is none (or it cannot be read)."""
        kept = self._kept.get(identifier.key)
        if kept is not None:
            return kept
        try:
            record = await self._record(identifier)
        except IdisError as exc:
            log.debug("template %s cannot be read: %s", identifier, exc)
            return None
        try:
            template = template_in(identifier, record.values)
        except IdisError:
            return None
        if len(self._kept) >= MAX_KEPT:
            self._kept.clear()
        self._kept[identifier.key] = template
        return template

    async def _record(self, identifier: Identifier) -> Record:
        rows = await self.authority.stored_rows([identifier.key])
        if identifier.key in rows:  # hosted here
            row = rows[identifier.key]
            if row is None:
                raise NotFound(f"template {identifier} not found")
            return decode_record(row.record)
        if self.resolve is None:
            raise NotFound(f"template {identifier} is not stored here and this node resolves none")
        return await self.resolve(identifier)

    async def prefetch(self, registrations: Iterable[tuple[Identifier, Fields]]) -> Fetched:
        """The templates those registrations (each identifier with its values by type,
        ``fields_of``) may follow, read once each: only those of the registration's own prefix
        or of one above it (a caller cannot make the node look up anything else), and at most
        MAX_NAMED_PER_CALL different ones (each may be a lookup in the hierarchy). A template not
        read maps to why. Malformed names are left to ``violation``."""
        named: dict[str, Identifier] = {}
        for identifier, fields in registrations:
            try:
                template = named_in(fields)
            except TemplateViolation:
                continue
            if template is not None and applies_to(template, identifier.prefix):
                named[template.key] = template
        fetched: Fetched = {}
        for n, (key, template) in enumerate(named.items()):
            if n >= MAX_NAMED_PER_CALL:
                fetched[key] = f"one call names more than {MAX_NAMED_PER_CALL} templates: {template} not read"
                continue
            fetched[key] = await self.template(template) or f"template {template} not found"
        return fetched

    def violation(
        self, identifier: Identifier, fields: Fields, fetched: Fetched, values: Iterable[Typed] = ()
    ) -> TemplateViolation | None:
        """What is wrong with registering ``values`` (``fields``: the same by type) at
        ``identifier``, template-wise (None: nothing)."""
        try:
            named = named_in(fields)
        except TemplateViolation as error:
            return error
        if named is None:
            if self.requires(identifier.prefix):
                why = f"prefix {identifier.prefix} requires a template: name one with a {REFERENCE_TYPE} value"
                return TemplateViolation.of([(REFERENCE_TYPE, why)], str(identifier))
            return None
        if not applies_to(named, identifier.prefix):
            why = f"{named} is not a template of {identifier.prefix} or of a prefix above it"
            return TemplateViolation.of([(REFERENCE_TYPE, why)], str(identifier))
        template = fetched.get(named.key, f"template {named} not found")
        if isinstance(template, str):
            return TemplateViolation.of([(REFERENCE_TYPE, template)], str(identifier))
        faults = check_fields(template, fields) + exposed(template, values)
        return TemplateViolation.of(faults, str(identifier)) if faults else None

    def fits(self, reference: bytes, prefix_key: str, record: bytes, fetched: Fetched) -> bool:
        """True when ``record`` (stored wire form, under the prefix ``prefix_key``, naming the
        template ``reference``) surely follows its template: the compiled check
        (``resolver.cache.TemplateCheck``) passes it. False: check it the slow way
        (``violation``), which says what is wrong, if anything."""
        named = reference_of(reference)
        if isinstance(named, str) or not applies_to(named, prefix_key):
            return False
        template = fetched.get(named.key)
        if not isinstance(template, Template):
            return False
        compiled = self._checks.get(named.key)
        if compiled is None or compiled[0] is not template:  # compiled from the template checked against
            if len(self._checks) >= MAX_KEPT:
                self._checks.clear()
            compiled = self._checks[named.key] = (template, TemplateCheck(template))
        return bool(compiled[1].fits(record))

    async def readable(self, record: Record, reader: Caller | None) -> Record:
        """What ``reader`` may read of ``record``: ``readable_part`` (every value for its
        administrators, else the public ones), and besides those the values of the items that
        the template the record names grants to the reader (tiered read grants). Nothing more
        when the record names no template or it cannot be read now."""
        shown = readable_part(record, reader, self.authority.permissions)
        if reader is None or len(shown.values) == len(record.values):
            return shown
        try:
            named = named_template(record.values)
        except TemplateViolation:
            return shown
        if named is None or not applies_to(named, record.identifier.prefix):
            return shown  # only a template of its own prefix or above may grant (as writes require)
        template = await self.template(named)
        granted = template.granted_to(reader.identity.key) if template is not None else frozenset()
        if not granted:
            return shown
        visible = {v.index for v in shown.values}
        extra = (v.index for v in record.values if v.type in granted and v.type != SECKEY_TYPE)
        visible.update(extra)
        return replace(record, values=tuple(v for v in record.values if v.index in visible))

    async def check(self, identifier: Identifier, values: Sequence[Typed]) -> None:
        """Raises TemplateViolation unless ``values`` may be registered at ``identifier``."""
        fields = fields_of(values)
        error = self.violation(identifier, fields, await self.prefetch([(identifier, fields)]), values)
        if error is not None:
            raise error
