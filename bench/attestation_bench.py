"""What verifiable resolution costs, per record (docs/verifiable-resolution.md).

    python -m bench.attestation_bench [--records 2000] [--runs 5]

For a batch of --records Wuhan-model records (bench.dataset), medians of --runs runs:

* an Ed25519 signature alone, and a record's leaf alone (its two digests): by the Python
  reference from Value objects, and as a node makes it from the stored record (``stored_leaf``:
  the values' wire forms hashed as they lie in the record, by the compiled module);
* per-record signing: one Ed25519 JWS per record (what HANDLE.NET's HS_SIGNATURE does);
* batch attestation: the leaves from the stored forms in one call, salts included
  (``stored_leaves``), the tree's levels and one signature for the whole batch (ours, as a
  signing node does it: ``nodes.trust.attester.Attester.sign_tree``);
* a reader's validation of one answer: the chain of two delegations from the anchor, the
  batch's signature and the record's inclusion proof (``verify_record``, from scratch), and
  the same with the chain and the batch's signature remembered (``Validator``: a dozen hashes);
* bytes: the proof an answer carries (attestation, path, private digest) and what a node stores
  per record (the tree's nodes).

Prints JSON: microseconds per record for each, and the ratio of per-record signing to ours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.dataset import registrations
from resolver.attestation import (
    Proof,
    TrustAnchor,
    Validator,
    ZoneKey,
    batch_attestation,
    delegation,
    inclusion_path,
    merkle_levels,
    private_digest,
    public_part,
    record_leaf,
    sign_statement,
    stored_leaf,
    stored_leaves,
    tree_blob,
    tree_root,
    value_bytes,
    verify_record,
)
from resolver.cache import record_salt
from resolver.identifier import parse_identifier
from resolver.record import Record
from resolver.wire import encode_record

NOW = 1_800_000_000


def _median_us(work: Callable[[], object], per: int, runs: int) -> tuple[float, float, float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) / per * 1e6)
    return round(statistics.median(times), 2), round(min(times), 2), round(max(times), 2)


def measure(count: int, runs: int) -> dict[str, Any]:
    records = [
        Record(parse_identifier(text), tuple(values), 1) for text, values in registrations("88.100.1", count, seed=3)
    ]
    keys = {p: Ed25519PrivateKey.generate() for p in ("88", "88.100", "88.100.1")}
    zone = {p: ZoneKey("k1", k.public_key()) for p, k in keys.items()}

    def per_record_jws() -> None:
        for r in records:
            digests = [{"index": v.index, "digest": hashlib.sha256(public_part([v])).hexdigest()} for v in r.values]
            sign_statement({"sub": r.identifier.key, "digests": digests}, keys["88.100.1"], "k1")

    stored = [(r.identifier.key, encode_record(r)) for r in records]

    names, wires = [k for k, _ in stored], [w for _, w in stored]
    secret = b"node secret"

    def batch() -> tuple[bytes, str]:
        """What a signing node does for a batch: the leaves in one call (salts included), the
        tree's levels, one signature (nodes.trust.attester.Attester.sign_tree)."""
        tree = tree_blob(merkle_levels(stored_leaves(names, [1] * count, wires, secret)))
        root = tree_root(tree)
        return tree, batch_attestation("88.100.1", keys["88.100.1"], "k1", root, len(records), NOW, 86_400)

    tree, statement = batch()
    paths = [inclusion_path(tree, count, i) for i in range(count)]
    chain = [
        delegation("88", keys["88"], "k1", "88.100", [zone["88.100"]], NOW, 86_400),
        delegation("88.100", keys["88.100"], "k1", "88.100.1", [zone["88.100.1"]], NOW, 86_400),
    ]
    anchor = TrustAnchor("88", (zone["88"],))
    sample = records[: min(200, count)]

    answers = [
        (
            r.identifier.key,
            [v for v in r.values if v.publicly_readable],
            Proof(
                statement,
                i,
                paths[i],
                chain,
                private=private_digest(r.values, record_salt(secret, r.identifier.key, 1)),
            ),
        )
        for i, r in enumerate(sample)
    ]

    def validate() -> None:
        for key, public, proof in answers:
            verify_record(anchor, key, 1, public, proof, NOW + 1)

    validator = Validator(anchor)

    def validate_remembering() -> None:
        for key, public, proof in answers:
            validator.verify(key, 1, public, proof, NOW + 1)

    message = b"x" * 300
    sign_only = _median_us(lambda: [keys["88"].sign(message) for _ in range(count)], count, runs)
    leaves_only = _median_us(lambda: [record_leaf(r, b"salt") for r in records], count, runs)
    leaves_stored = _median_us(lambda: [stored_leaf(k, 1, w, b"salt") for k, w in stored], count, runs)
    jws = _median_us(per_record_jws, count, runs)
    ours = _median_us(batch, count, runs)
    check = _median_us(validate, len(sample), runs)
    remembering = _median_us(validate_remembering, len(sample), runs)
    record_bytes = statistics.mean(sum(len(value_bytes(v)) for v in r.values) for r in records)
    proof_bytes = len(statement) + 32 * statistics.mean(len(p) for p in paths) + 32 + 8
    return {
        "machine": platform.processor() or platform.machine(),
        "records": count,
        "runs": runs,
        "ed25519_signature_alone_us": {"median": sign_only[0], "min": sign_only[1], "max": sign_only[2]},
        "leaf_alone_us_python_reference": {"median": leaves_only[0], "min": leaves_only[1], "max": leaves_only[2]},
        "leaf_alone_us_from_the_stored_record": {
            "median": leaves_stored[0],
            "min": leaves_stored[1],
            "max": leaves_stored[2],
        },
        "per_record_jws_us": {"median": jws[0], "min": jws[1], "max": jws[2]},
        "batch_tree_and_one_signature_us_per_record": {"median": ours[0], "min": ours[1], "max": ours[2]},
        "ratio_per_record_jws_vs_batch": round(jws[0] / ours[0], 1),
        "validation_us_per_answer_from_scratch": {"median": check[0], "min": check[1], "max": check[2]},
        "validation_us_per_answer_chain_and_batch_remembered": {
            "median": remembering[0],
            "min": remembering[1],
            "max": remembering[2],
        },
        "record_values_bytes_mean": round(record_bytes, 1),
        "proof_bytes_per_answer": round(proof_bytes, 1),
        "tree_bytes_stored_per_record": 64,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.records, args.runs), indent=2))


if __name__ == "__main__":
    main()
