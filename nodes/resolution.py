"""The resolution service, the hot path: request bytes in, response bytes out.

Its methods take and return raw bytes (no gRPC (de)serialisers). A request the lookup cache can
answer whole is answered by ``LookupCache.answer_one``/``answer_batch`` straight from the
request bytes to the response bytes, in C, with no protobuf object built. A miss of a plain
request (an identifier, nothing else) from an anonymous reader is answered from the record's
stored bytes: the authority reads the stored wire forms of a whole batch in one query and
``anonymous_response`` (C) copies each into a ResolveResponse without its non-public values,
the bytes the Python path would build, no Record decoded. Anything else (filters, recursion,
signed readers, referrals, errors, absolute TTLs, a malformed request) takes the Python path:
decode, ask the authority (or the recursor), encode. Either way the encoded answer is cached
for next time.

What is cached, keyed by the normalised identifier (or, for referrals, the delegated prefix):

* records, as an anonymous reader sees them (public values only): the serialised
  ResolveResponse, for ``cache_max_ttl`` seconds; every write to the
  identifier invalidates it before the write is acknowledged, so the TTL only bounds memory;
* referrals: under the delegated prefix, for the referral's TTL (at most ``cache_max_ttl``);
  re-delegating invalidates the prefix;
* NOT_FOUND: the serialised ResolveBatchItem, for the negative TTL; creating the identifier or
  its prefix invalidates it.

An answer computed while an invalidation happened (the cache ``generation`` moved) is not
cached, so a write racing with a miss can never leave a stale entry behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from nodes.authority import Authority
from nodes.proofs import Proofs
from nodes.storage import RecordRow
from nodes.templates import Templates
from nodes.trust.audit import Caller, current_actor
from nodes.trust.permissions import readable_part
from nodes.trust.quotas import charge
from resolver.attestation import PROOF_METADATA
from resolver.cache import POSITIVE, LookupCache, anonymous_response, answer_item, identifier_of, identifiers_of
from resolver.errors import FailedPrecondition, IdisError, LimitExceeded, NotFound
from resolver.identifier import Identifier, parse_identifier
from resolver.record import Limits, Record, TtlType
from resolver.resolver import Resolver
from resolver.site import Referral
from resolver.wire import (
    decode_record,
    decode_request,
    frame_batch_item,
    item_status,
    not_found_from_item,
    not_found_item,
    proof_field,
    proof_field_of,
    record_to_pb,
    referral_to_pb,
    resolution_pb2,
)

SERVICE = "idis.v1.Resolution"

_wants_proofs: ContextVar[bool] = ContextVar("idis_wants_proofs", default=False)
"""Whether the call being answered asked for proofs (set by each gRPC method)."""


def asks_for_proofs(context: Any) -> bool:
    """True when a call's metadata asks for proofs (``PROOF_METADATA``)."""
    try:
        metadata = context.invocation_metadata() or ()
    except AttributeError:
        return False
    return any(key == PROOF_METADATA and value == "1" for key, value in metadata)


@dataclass(frozen=True, slots=True)
class Relayed:
    """A record resolved upstream for a recursive request, with the proof it came with (as
    ResolveResponse field bytes; empty when it had none), relayed so clients validate too."""

    record: Record
    proof: bytes


def _select(record: Record, request: resolution_pb2.ResolveRequest) -> Record:
    """Applies the request's type and index filters."""
    if not request.types and not request.indexes:
        return record
    types, indexes = set(request.types), set(request.indexes)
    kept = tuple(v for v in record.values if (not types or v.type in types) and (not indexes or v.index in indexes))
    return Record(record.identifier, kept, record.version)


def _reader() -> Caller | None:
    """The authenticated reader of this call (signed reads only), else None: anonymous."""
    actor = current_actor.get()
    return actor.caller if actor is not None else None


class ResolutionService:
    def __init__(
        self,
        authority: Authority,
        limits: Limits,
        recursor: Resolver | None,
        clock: Callable[[], float],
        cache: LookupCache | None = None,
        cache_max_ttl: int = 3600,
        on_referral: Callable[[], None] | None = None,
        recursive_per_call: int = 16,
        recursive_cost: float = 10.0,
        proofs: Proofs | None = None,
        proof_cache: LookupCache | None = None,
        templates: Templates | None = None,
    ) -> None:
        """``recursive_per_call``: distinct identifiers one call (one message of a stream) may
        have resolved recursively (0: none); each costs the caller's peer ``recursive_cost``
        tokens besides its item's one (``nodes.trust.quotas.charge``). ``proof_cache``: where
        answers with proofs are cached, beside ``cache`` for those without (calls asking for
        proofs, ``PROOF_METADATA``, get them when the node signs or relays them)."""
        self.authority = authority
        self.limits = limits
        self.recursor = recursor
        self.clock = clock
        self._lean_cache = cache
        self._proof_cache = proof_cache
        self.cache_max_ttl = cache_max_ttl
        self.on_referral = on_referral or (lambda: None)
        self.recursive_per_call = recursive_per_call
        self.recursive_cost = recursive_cost
        self.proofs = proofs
        """Signs denials and proves records (verifiable resolution), when the node signs."""
        self.templates = templates
        """Whose tiered read grants signed readers get (``Templates.readable``)."""

    def _proving(self) -> bool:
        """True when this call asked for proofs and the node gives them (it signs, or relays
        what it resolves); never when it cannot cache them apart from the answers without."""
        can = self.proofs is not None or self.recursor is not None
        return can and _wants_proofs.get() and (self._proof_cache is not None or self._lean_cache is None)

    @property
    def cache(self) -> LookupCache | None:
        """The cache of this call's kind of answers: with proofs, or without."""
        return self._proof_cache if self._proving() else self._lean_cache

    # --- the Python path ---------------------------------------------------------------------

    async def _domain_answer(
        self, ident: Identifier, request: resolution_pb2.ResolveRequest
    ) -> Record | RecordRow | Relayed | Referral:
        if request.recursive:
            if self.recursor is None:
                raise FailedPrecondition("recursion is not enabled on this node; ask without recursive")
            charge(self.recursive_cost)  # upstream calls on the caller's behalf: paid by the caller
            record, data = await self.recursor.resolve_answer(ident)
            return Relayed(record, proof_field_of(data))
        [answer] = await self.authority.answer_rows([ident])
        if isinstance(answer, NotFound):
            raise self._denied(answer, ident)
        if isinstance(answer, IdisError):
            raise answer
        return answer

    def _denied(self, error: NotFound, ident: Identifier) -> NotFound:
        """``error`` (this node's NOT_FOUND for ``ident``) signed, when the node signs and the
        call asked for proofs."""
        entry = self.authority.closest_entry(ident.prefix)
        if self.proofs is None or entry is None or not self._proving():
            return error
        return self.proofs.deny(error, entry.prefix.key, ident.key)

    async def answer(
        self, request: resolution_pb2.ResolveRequest, reader: Caller | None = None
    ) -> resolution_pb2.ResolveResponse:
        """The answer to one request, cached in wire form when it is cacheable."""
        ident = parse_identifier(request.identifier)
        # Read before the answer is computed: an invalidation in between (here or published by
        # another worker) makes the answer uncacheable.
        generation = self.cache.generation if self.cache is not None else 0
        try:
            answer = await self._domain_answer(ident, request)
        except NotFound as error:
            if not self._proving():
                error.denial = b""  # an upstream node's, relayed only to those who asked
            self._cache_not_found(ident, request, error, generation)
            raise
        return await self._respond(ident, request, answer, generation, reader)

    def _cacheable(self, request: resolution_pb2.ResolveRequest) -> bool:
        return self.cache is not None and not (request.types or request.indexes or request.recursive)

    def _cache_not_found(
        self, ident: Identifier, request: resolution_pb2.ResolveRequest, error: NotFound, generation: int
    ) -> None:
        # The message quotes the identifier as written: cache it only under that exact spelling.
        # A signing node's NOT_FOUND left unsigned (over its rate of denials) is not cached: it
        # would be refused by validating resolvers for as long as it stayed.
        unsigned = self.proofs is not None and self._proving() and not error.denial
        if self.cache is not None and self._cacheable(request) and ident.key == request.identifier and not unsigned:
            data = not_found_item(str(error), error.negative_ttl, error.denial)
            ttl = min(error.negative_ttl, self.cache_max_ttl)
            self.cache.set(ident.key.encode(), data, ttl, True, if_generation=generation)

    def _signed_referral(self, referral: Referral) -> Referral:
        """A referral of this node's with the delegations down to its prefix, when it signs."""
        entry = self.authority.entry(referral.prefix)
        if self.proofs is None or entry is None or referral.delegations or not self._proving():
            return referral
        delegations = self.proofs.referral_delegations(referral.prefix.key, entry.zone_keys)
        return Referral(referral.prefix, referral.site, referral.ttl, delegations)

    async def _respond(
        self,
        ident: Identifier,
        request: resolution_pb2.ResolveRequest,
        answer: Record | RecordRow | Relayed | Referral,
        generation: int,
        reader: Caller | None = None,
    ) -> resolution_pb2.ResolveResponse:
        # Only answers for anonymous readers are cached, so no cache ever holds a private value.
        cache = self.cache if self._cacheable(request) and reader is None else None
        if isinstance(answer, Referral):
            self.on_referral()
            answer = self._signed_referral(answer)
            response = resolution_pb2.ResolveResponse(referral=referral_to_pb(answer), ttl=answer.ttl)
            if cache is not None:
                ttl = min(answer.ttl, self.cache_max_ttl)
                cache.set(answer.prefix.key.encode(), response.SerializeToString(), ttl, if_generation=generation)
            return response
        row = answer if isinstance(answer, RecordRow) else None
        relayed = answer.proof if isinstance(answer, Relayed) else b""
        if isinstance(answer, RecordRow):
            record = decode_record(answer.record)
        else:
            record = answer.record if isinstance(answer, Relayed) else answer
        if reader is not None and self.templates is not None and not isinstance(answer, Relayed):
            # Tiered read grants: of records stored here only, never of what another node relayed.
            readable = await self.templates.readable(record, reader)
        else:
            readable = readable_part(record, reader, self.authority.permissions)
        response = resolution_pb2.ResolveResponse(
            record=record_to_pb(_select(readable, request)), ttl=record.cache_ttl(int(self.clock()))
        )
        if row is not None and not (request.types or request.indexes):
            await self._prove(response, row, record, readable, reader)
        elif relayed and self._proving() and not (request.types or request.indexes) and readable == record:
            response.MergeFromString(relayed)  # what the upstream node proved, as it proved it
        # A record with absolute TTLs has a ttl that changes with time: never served from bytes.
        if cache is not None and all(v.ttl_type is TtlType.RELATIVE for v in record.values):
            cache.set(ident.key.encode(), response.SerializeToString(), self.cache_max_ttl, if_generation=generation)
        return response

    async def _prove(
        self,
        response: resolution_pb2.ResolveResponse,
        row: RecordRow,
        record: Record,
        readable: Record,
        reader: Caller | None,
    ) -> None:
        """Adds the proof of ``row`` to an unfiltered answer showing ``readable`` of ``record``,
        when the node signs. A filtered answer carries none (the digests cover whole records),
        nor does one showing some private values but not all (an HS_SECKEY withheld from a
        reader of the rest): neither could be verified. An anonymous reader gets the private
        digest even when every value is public: the same bytes whichever path made the answer."""
        everything = len(readable.values) == len(record.values)
        if self.proofs is None or not self._proving():
            return
        if not (everything or all(v.publicly_readable for v in readable.values)):
            return
        [proof] = await self.proofs.of_rows([row], [reader is not None and everything])
        if proof is not None:
            response.MergeFromString(proof_field(proof))

    async def answer_items(
        self, requests: Sequence[resolution_pb2.ResolveRequest], reader: Caller | None = None
    ) -> list[resolution_pb2.ResolveBatchItem]:
        """Batch items for many requests; the records they need are read in one store query."""
        generation = self.cache.generation if self.cache is not None else 0
        answers: list[Record | RecordRow | Relayed | Referral | IdisError | None] = [None] * len(requests)
        idents: list[Identifier | None] = [None] * len(requests)
        plain: list[int] = []
        recursive: dict[str, Record | RecordRow | Relayed | Referral | IdisError] = {}  # one upstream each
        for position, request in enumerate(requests):
            try:
                idents[position] = parse_identifier(request.identifier)
            except IdisError as error:
                answers[position] = error
                continue
            if request.recursive:
                key = idents[position].key  # type: ignore[union-attr]
                if key not in recursive and len(recursive) >= self.recursive_per_call:
                    answers[position] = LimitExceeded(
                        f"at most {self.recursive_per_call} identifiers are resolved recursively per call;"
                        " ask for the others in another call"
                    )
                    continue
                if key not in recursive:
                    try:
                        recursive[key] = await self._domain_answer(idents[position], request)  # type: ignore[arg-type]
                    except IdisError as error:
                        recursive[key] = error
                answers[position] = recursive[key]
            else:
                plain.append(position)
        found = await self.authority.answer_rows([idents[p] for p in plain])  # type: ignore[misc]
        for position, one in zip(plain, found, strict=True):
            answers[position] = one
        items = []
        for request, ident, outcome in zip(requests, idents, answers, strict=True):
            if isinstance(outcome, (Record, RecordRow, Relayed, Referral)) and ident is not None:
                response = await self._respond(ident, request, outcome, generation, reader)
                items.append(resolution_pb2.ResolveBatchItem(status=item_status(None), response=response))
                continue
            assert isinstance(outcome, IdisError)
            items.append(self._error_item(outcome, request, ident, generation, reader))
        return items

    def _error_item(
        self,
        error: IdisError,
        request: resolution_pb2.ResolveRequest,
        ident: Identifier | None,
        generation: int,
        reader: Caller | None,
    ) -> resolution_pb2.ResolveBatchItem:
        """The batch item of a failed request; a NOT_FOUND of this node's own is signed (when
        it signs) and cached for anonymous readers."""
        item = resolution_pb2.ResolveBatchItem(status=item_status(error))
        if isinstance(error, NotFound):
            if ident is not None and not request.recursive:
                error = self._denied(error, ident)
            elif not self._proving():
                error.denial = b""  # an upstream node's, relayed only to those who asked
            item.negative_ttl = error.negative_ttl
            if error.denial:
                item.denial.ParseFromString(error.denial)
            if ident is not None and reader is None:
                self._cache_not_found(ident, request, error, generation)
        return item

    # --- misses answered from the stored bytes ------------------------------------------------

    async def _stored_answers(self, wanted: Sequence[tuple[bytes, bytes]]) -> list[bytes | NotFound | None]:
        """Answers for an anonymous reader to plain requests that missed the cache, given as
        ``(key, identifier as written)`` (``resolver.cache.identifier_of``), built from the
        records' stored wire form with no Record decoded: per request, the serialised
        ResolveResponse, or the NotFound to answer, or None where the Python path must answer
        (a referral, an unallocated prefix, a record with absolute TTLs...). Each is what the
        Python path would answer, byte for byte, and is cached as it would cache it."""
        cache, proving = self.cache, self.proofs is not None and self._proving()  # this call's kind, once
        assert cache is not None
        # Read before the store is: see answer().
        generation = cache.generation
        keys = [key.decode() for key, _ in wanted]
        stored = await self.authority.stored_rows(keys)
        proofs = await self._anonymous_proofs(stored)
        answers: list[bytes | NotFound | None] = []
        for (key, written), text in zip(wanted, keys, strict=True):
            if text not in stored:
                answers.append(None)
                continue
            row = stored[text]
            if row is None:
                error = self.authority.not_found(written.decode())
                if proving and self.proofs is not None:
                    self.proofs.deny(error, text.partition("/")[0], text)
                if key == written and (not proving or error.denial):  # see _cache_not_found
                    data = not_found_item(str(error), error.negative_ttl, error.denial)
                    ttl = min(error.negative_ttl, self.cache_max_ttl)
                    cache.set(key, data, ttl, True, if_generation=generation)
                answers.append(error)
                continue
            response = anonymous_response(row.record)
            if response is not None:
                response += proofs.get(text, b"")
                cache.set(key, response, self.cache_max_ttl, if_generation=generation)
            answers.append(response)
        return answers

    async def _anonymous_proofs(self, stored: dict[str, RecordRow | None]) -> dict[str, bytes]:
        """The proofs (as ResolveResponse field bytes) of the rows found, when the node signs."""
        if self.proofs is None or not self._proving():
            return {}
        rows = [row for row in stored.values() if row is not None and row.attestation is not None]
        if not rows:
            return {}
        return dict(zip([r.key for r in rows], await self.proofs.anonymous_fields(rows), strict=True))

    async def _answer_misses(self, request: bytes, parts: list[bytes | None]) -> None:
        """Fills in ``parts`` (``LookupCache.answer_batch``'s, None for each miss) what
        ``_stored_answers`` can answer."""
        identifiers = identifiers_of(request)
        if identifiers is None or len(identifiers) != len(parts):
            return
        wanted = [(p, i) for p, (part, i) in enumerate(zip(parts, identifiers, strict=True)) if part is None and i]
        if not wanted:
            return
        answers = await self._stored_answers([i for _, i in wanted])
        for (position, _), answer in zip(wanted, answers, strict=True):
            if isinstance(answer, NotFound):
                parts[position] = frame_batch_item(not_found_item(str(answer), answer.negative_ttl, answer.denial))
            elif answer is not None:
                parts[position] = answer_item(answer)

    # --- bytes in, bytes out ----------------------------------------------------------------

    async def resolve_bytes(self, request: bytes) -> bytes:
        """A serialised ResolveResponse; NOT_FOUND and other failures raise domain errors."""
        reader, cache = _reader(), self.cache
        if cache is not None and reader is None:
            hit = cache.answer_one(request)
            if hit is not None:
                kind, data = hit
                if kind == POSITIVE:
                    return bytes(data)
                raise NotFound(*not_found_from_item(data))
            plain = identifier_of(request)
            if plain is not None:
                (stored,) = await self._stored_answers([plain])
                if isinstance(stored, NotFound):
                    raise stored
                if stored is not None:
                    return stored
        response = await self.answer(
            decode_request(resolution_pb2.ResolveRequest.FromString, request, "idis.v1.ResolveRequest"), reader
        )
        return response.SerializeToString()

    async def resolve_batch_bytes(self, request: bytes) -> bytes:
        """A serialised ResolveBatchResponse; only a malformed or oversized batch raises."""
        parts: list[bytes | None] | None = None
        reader, cache = _reader(), self.cache
        if cache is not None and reader is None:
            fast = cache.answer_batch(request, self.limits.max_batch)
            if isinstance(fast, bytes):
                return fast
            parts = fast
            if parts is not None:
                await self._answer_misses(request, parts)
                if None not in parts:
                    return b"".join(parts)  # type: ignore[arg-type]
        batch = decode_request(resolution_pb2.ResolveBatchRequest.FromString, request, "idis.v1.ResolveBatchRequest")
        self.limits.check_batch(len(batch.requests))
        if parts is None:
            parts = [None] * len(batch.requests)
        missing = [position for position, part in enumerate(parts) if part is None]
        items = await self.answer_items([batch.requests[p] for p in missing], reader)
        for position, item in zip(missing, items, strict=True):
            parts[position] = frame_batch_item(item.SerializeToString())
        return b"".join(p for p in parts if p is not None)

    # --- gRPC --------------------------------------------------------------------------------

    async def Resolve(self, request: bytes, context: Any) -> bytes:
        _wants_proofs.set(asks_for_proofs(context))
        return await self.resolve_bytes(request)

    async def ResolveBatch(self, request: bytes, context: Any) -> bytes:
        _wants_proofs.set(asks_for_proofs(context))
        return await self.resolve_batch_bytes(request)

    async def ResolveStream(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        _wants_proofs.set(asks_for_proofs(context))
        async for request in requests:
            yield await self.resolve_batch_bytes(request)

    async def Ping(self, request: bytes, context: Any) -> bytes:
        return request  # PingRequest and PingResponse share one layout: echoing is answering

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        """The service with raw-bytes methods (no protobuf (de)serialisers)."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Resolve": grpc.unary_unary_rpc_method_handler(self.Resolve),
                "ResolveBatch": grpc.unary_unary_rpc_method_handler(self.ResolveBatch),
                "ResolveStream": grpc.stream_stream_rpc_method_handler(self.ResolveStream),
                "Ping": grpc.unary_unary_rpc_method_handler(self.Ping),
            },
        )
