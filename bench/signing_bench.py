"""What verifiable resolution costs a node: the same node with [signing] on and off, measured in
the same run.

    python -m bench.signing_bench [--runs 3] [--duration 5] [--count 20000] [--out bench/results]

Starts, on 127.0.0.1 in a temporary folder, two enterprise nodes (apex 88.100.1, cache on,
synchronous=normal, no quotas), one signing (its apex key is the trust anchor) and one not.
Then, for --runs rounds in alternating order, idis-bench's load generator runs against each:

* register-batch: BatchCreate of 2000 new identifiers a call, 8 calls in flight (each batch one
  signed Merkle tree on the signing node);
* batch100 and unary resolve of --count registrations, all cache hits (the signing node's
  cached answers carry their proofs: the bytes grow, the work should not).

Also reported: bytes per registration on disk (both databases after the same --count
registrations), the proof's bytes in an answer, and a client's validation cost per answer
(``Validator`` over real answers of the signing node: from scratch, and with the chain and the
batch remembered). Prints JSON with medians and the on/off ratios; writes a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc.aio

from bench.dataset import registrations
from bench.e2e_bench import PREFIX, seed_and_warm
from bench.idis_bench import closed_loop, headline, require_bench_extra, run_load
from bench.report import publish
from nodes.hierarchy import NodeProcess, NodeSpec
from nodes.trust.zone_keys import ZoneKeys
from resolver.attestation import PROOF_METADATA, Validator, anchor_text, load_anchor
from resolver.record import Record
from resolver.wire import decode_answer, proof_from_pb, resolution_pb2, resolution_pb2_grpc

SCENARIOS = (("register_batch", "register-batch", 2000, 8), ("batch100", "batch", 100, 4), ("unary", "resolve", 1, 16))


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start(state: Path, name: str, signing: bool) -> NodeProcess:
    extra: dict[str, dict[str, Any]] = {
        "storage": {"synchronous": "normal"},
        "quotas": {"peer_calls_per_second": 0, "peer_burst": 0, "identity_writes_per_second": 0},
    }
    if signing:
        keys = ZoneKeys(state / "zone-keys")
        now = int(time.time())
        keys.signing(PREFIX, now)
        (state / "anchor.json").write_text(anchor_text(PREFIX, keys.published(PREFIX, now)))
        extra["signing"] = {"enabled": True, "keys": "zone-keys", "anchor": "anchor.json"}
    spec = NodeSpec(name, "enterprise", PREFIX, 0, extra=extra)
    (state / f"{name}.toml").write_text(spec.config_text())
    node = NodeProcess(state / f"{name}.toml", state / f"{name}.log")
    node.start()
    return node


def measure(workload: str, batch: int, concurrency: int, node: NodeProcess, args: argparse.Namespace) -> dict[str, Any]:
    opts = closed_loop(
        workload,
        node.address,
        prefix=PREFIX,
        keys=args.count,
        batch_size=batch,
        concurrency=concurrency,
        duration=args.duration,
        warmup=args.warmup,
        processes=args.processes,
        server_pids=[node.proc.pid if node.proc else 0],
        seed=int(time.time() * 1000) % 1_000_000,  # new identifiers for every register-batch run
    )
    return headline(run_load(opts, show_progress=False))


def database_bytes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, size = db.execute("PRAGMA page_count").fetchone()[0], db.execute("PRAGMA page_size").fetchone()[0]
    return int(pages * size)


async def validation_cost(address: str, anchor_path: Path, count: int) -> dict[str, float]:
    """Per answer: the proof's bytes, and a Validator's time from scratch and remembering."""
    identifiers = [ident for ident, _ in registrations(PREFIX, count)][:: max(1, count // 1000)][:1000]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = resolution_pb2_grpc.ResolutionStub(channel)
        requests = [resolution_pb2.ResolveRequest(identifier=i) for i in identifiers]
        request = resolution_pb2.ResolveBatchRequest(requests=requests)
        reply = await stub.ResolveBatch(request, metadata=((PROOF_METADATA, "1"),))
    answers = []
    for item in reply.items:
        if item.status.code == 0 and item.response.HasField("proof"):
            record = decode_answer(item.response.SerializeToString())
            assert isinstance(record, Record)
            answers.append((record, proof_from_pb(item.response.proof), item.response.proof.ByteSize()))
    if not answers:
        raise RuntimeError("the signing node's answers carry no proofs")
    anchor, now = load_anchor(anchor_path), int(time.time())
    started = time.perf_counter()
    for record, proof, _ in answers:
        Validator(anchor, max_entries=0).verify(record.identifier.key, record.version, record.values, proof, now)
    scratch = (time.perf_counter() - started) / len(answers)
    remembering = Validator(anchor)
    started = time.perf_counter()
    for record, proof, _ in answers:
        remembering.verify(record.identifier.key, record.version, record.values, proof, now)
    remembered = (time.perf_counter() - started) / len(answers)
    return {
        "answers": len(answers),
        "proof_bytes_median": statistics.median(size for _, _, size in answers),
        "validate_us_from_scratch": round(scratch * 1e6, 1),
        "validate_us_remembering": round(remembered * 1e6, 1),
    }


async def batches_per_second(address: str, identifiers: list[str], proofs: bool, seconds: float) -> float:
    """Identifiers a second resolved by 4 callers sending ResolveBatch of 100 (cache hits), with
    or without asking for proofs: what a validating client's answers cost against the others'."""
    metadata = ((PROOF_METADATA, "1"),) if proofs else None
    batches = [
        resolution_pb2.ResolveBatchRequest(
            requests=[resolution_pb2.ResolveRequest(identifier=i) for i in identifiers[s : s + 100]]
        )
        for s in range(0, len(identifiers) - 99, 100)
    ]
    done = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = resolution_pb2_grpc.ResolutionStub(channel)
        for batch in batches[:20]:  # both kinds of answers cached before the clock starts
            await stub.ResolveBatch(batch, metadata=metadata)
        deadline = time.perf_counter() + seconds

        async def caller(first: int) -> None:
            nonlocal done
            n = first
            while time.perf_counter() < deadline:
                await stub.ResolveBatch(batches[n % len(batches)], metadata=metadata)
                done += 100
                n += 4

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(4)))
        return done / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--count", type=int, default=20000, help="registrations on each node")
    parser.add_argument("--processes", type=int, default=1, help="load-generator processes")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    require_bench_extra()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="idis-signing-") as tmp:
        state = Path(tmp)
        nodes = {"unsigned": start(state, "unsigned", False), "signed": start(state, "signed", True)}
        try:
            for name, node in nodes.items():
                progress(f"seeding {args.count} registrations on the {name} node")
                asyncio.run(seed_and_warm(node.address, args.count))
            sizes = {name: database_bytes(state / f"{name}.sqlite3") for name in nodes}
            validation = asyncio.run(validation_cost(nodes["signed"].address, state / "anchor.json", args.count))
            hot = [ident for ident, _ in registrations(PREFIX, args.count)][:10_000]
            with_proofs: dict[str, list[float]] = {"with": [], "without": []}
            for round_ in range(args.runs):
                for proofs in (True, False) if round_ % 2 == 0 else (False, True):
                    rate = asyncio.run(batches_per_second(nodes["signed"].address, hot, proofs, args.duration))
                    with_proofs["with" if proofs else "without"].append(round(rate))
                    progress(f"run {round_ + 1}/{args.runs} batch100 signed node, proofs {proofs}: {rate:.0f} items/s")
            for round_ in range(args.runs):
                order = list(nodes.items()) if round_ % 2 == 0 else list(reversed(nodes.items()))
                for scenario, workload, batch, concurrency in SCENARIOS:
                    for name, node in order:
                        figures = measure(workload, batch, concurrency, node, args)
                        results.setdefault(f"{scenario}_{name}", []).append(figures)
                        progress(
                            f"run {round_ + 1}/{args.runs} {scenario} {name}: {figures['items_per_s']:.0f} items/s,"
                            f" server CPU {figures['server_cpu_us_per_item']} us/item"
                        )
        finally:
            for node in nodes.values():
                node.stop()

    def ratio(scenario: str, key: str = "items_per_s") -> float:
        pairs = zip(results[f"{scenario}_signed"], results[f"{scenario}_unsigned"], strict=True)
        return round(statistics.median(float(s[key]) / float(u[key]) for s, u in pairs if u[key]), 3)

    report = {
        "registrations": args.count,
        "runs": args.runs,
        "seconds_per_run": args.duration,
        "median": {
            k: {f: statistics.median(r[f] for r in v) for f in ("items_per_s", "p99_ms", "server_cpu_us_per_item")}
            for k, v in results.items()
        },
        "ratios_signed_vs_unsigned": {
            "register_batch_items": ratio("register_batch"),
            "register_batch_server_cpu_per_item": ratio("register_batch", "server_cpu_us_per_item"),
            "batch100_hits_items": ratio("batch100"),
            "unary_hits_items": ratio("unary"),
        },
        "bytes_per_registration": {name: round(size / args.count, 1) for name, size in sizes.items()},
        "validation": validation,
        "batch100_hits_signed_node_asked_with_vs_without_proofs": {
            "items_per_s_with": statistics.median(with_proofs["with"]),
            "items_per_s_without": statistics.median(with_proofs["without"]),
            "ratio": round(
                statistics.median(w / o for w, o in zip(with_proofs["with"], with_proofs["without"], strict=True)), 3
            ),
            "all_runs": with_proofs,
        },
        "all_runs": results,
    }
    report["bytes_per_registration"]["added_by_signing"] = round(
        report["bytes_per_registration"]["signed"] - report["bytes_per_registration"]["unsigned"], 1
    )
    publish(report, args.out, "signing_bench", lambda path: plot(report, path), hidden=("all_runs",))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s, *_ in SCENARIOS]
    med = report["median"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, name in ((-width / 2, "unsigned"), (width / 2, "signed")):
        values = [med[f"{s}_{name}"]["items_per_s"] for s in scenarios]
        ax.bar([i + offset for i in range(len(scenarios))], values, width, label=name)
    ax.set_xticks(range(len(scenarios)), ["BatchCreate x2000", "ResolveBatch x100 (hits)", "Resolve (hits)"])
    ax.set_ylabel("items/s (median)")
    ax.set_yscale("log")
    ax.set_title("Verifiable resolution: the same node signing and not")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
