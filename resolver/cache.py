"""The lookup cache: normalised identifiers (and delegated prefixes) to pre-serialised answers.

One cache type serves every tier. On a node it sits in front of SQLite and lets the resolution
service answer a hit straight from request bytes to response bytes (``answer_one``,
``answer_batch``) without building a protobuf object. In the resolver library it holds the
records, NOT_FOUND answers and referrals learnt while chasing the hierarchy.

Keys are bytes: ``PREFIX/suffix`` (prefix upper-cased) for identifiers, ``PREFIX`` for a
delegated prefix whose referral answers everything below it. Values are bytes:
a serialised ``ResolveResponse`` (record or referral) for positive entries, a serialised
``ResolveBatchItem`` (status NOT_FOUND and negative TTL) for negative ones.

Contract, shared by the compiled module ``resolver._cache`` and its pure-Python twin
``resolver._cache_py`` (one test suite runs against both):

* bounded by ``max_entries`` and by ``max_bytes`` of keys plus values;
* each entry lives for its own TTL (whole seconds, rounded up): expired entries are dropped when
  met (lazily) and by ``expire()`` (periodically, incrementally);
* ``invalidate(key)`` and ``invalidate_prefix(prefix)`` forget entries and advance
  ``generation``, so an answer computed while an invalidation happened is not cached stale;
* eviction is S3-FIFO: scan-resistant, FIFO-cheap (see ``resolver/_cache.pyx``);
* ``stats()`` counts hits, misses, insertions, evictions, expirations, invalidations;
* the wire fast path answers only what the slow path would answer: a request whose identifier
  breaks the grammar of ``resolver/identifier.py`` (or is not UTF-8) is never answered from the
  cache, not even by a referral cached for its prefix, but left to the slow path (``None``),
  which refuses it; it counts as neither a hit nor a miss.
* ``identifier_of``/``identifiers_of`` pick out the requests that ask for nothing but a
  grammatical identifier, and ``anonymous_response`` builds, from a record's stored wire form,
  the exact ResolveResponse bytes the slow path gives an anonymous reader (or None when only the
  slow path may: absolute TTLs, or a form the protobuf encoder would not reproduce), which
  ``answer_item`` frames as a batch item: a node's cache misses are answered with them without
  decoding the record.
* ``handle_answer`` answers a Handle-protocol resolution request (``resolver/handle_protocol.py``)
  from a cache of Handle answers: the values section an anonymous reader gets (positive), or a
  response code and body (negative); ``UdpEndpoint`` is a node's UDP receive-and-answer loop
  around it (``recvmmsg``/``sendmmsg`` in the compiled module); ``handle_values`` builds the
  values section of such an answer from a record's stored wire form (its miss path).
* ``created_records`` is the write side's fast path: from a BatchCreateRequest in wire form, the
  record each plain item is stored as (checked, defaults applied, stamped), byte for byte what
  the Python path would store, or None for the items only the Python path may take;
  ``count_items`` counts a batch request's items without decoding them (what a batch costs).
* ``TemplateCheck(template).fits(record)`` is the write side's template fast path: True only
  when ``resolver.template`` finds no fault in the record (stored wire form); False means "ask
  the Python check". ``template_reference`` gives the data of a record's one TEMPLATE value.

``LookupCache`` below is the compiled implementation when it was built, else the twin (with a
warning).
"""

from __future__ import annotations

import warnings
from types import ModuleType

from resolver import _cache_py

IMPLEMENTATIONS: dict[str, ModuleType] = {"python": _cache_py}
try:
    from resolver import _cache as _compiled
except ImportError:  # pragma: no cover - depends on the build
    _impl: ModuleType = _cache_py
    IMPLEMENTATION = "python"
    warnings.warn(
        "resolver._cache (the compiled lookup cache) is not built; using the slower pure-Python twin."
        " Reinstall with a C compiler available (pip install .) to build it.",
        RuntimeWarning,
        stacklevel=1,
    )
else:
    _impl = _compiled
    IMPLEMENTATION = "cython"
    IMPLEMENTATIONS["cython"] = _compiled

LookupCache = _impl.LookupCache
ChangeLog = _impl.ChangeLog
normalise_key = _impl.normalise_key
identifier_of = _impl.identifier_of
identifiers_of = _impl.identifiers_of
anonymous_response = _impl.anonymous_response
answer_item = _impl.answer_item
UdpEndpoint = _impl.UdpEndpoint
handle_values = _impl.handle_values
created_records = _impl.created_records
count_items = _impl.count_items
record_digests = _impl.record_digests
record_leaves = _impl.record_leaves
record_salt = _impl.record_salt
tree_levels = _impl.tree_levels
TemplateCheck = _impl.TemplateCheck
template_reference = _impl.template_reference
POSITIVE: int = _cache_py.POSITIVE
NEGATIVE: int = _cache_py.NEGATIVE
LOG_KEY: int = _cache_py.LOG_KEY
LOG_PREFIX: int = _cache_py.LOG_PREFIX
