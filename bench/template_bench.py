"""What checking registrations against their metadata template costs (issue 16).

    python -m bench.template_bench [--runs 5] [--batches 10] [--out bench/results]

Starts a secondary node for 88.100 on 127.0.0.1 (SQLite, in a temporary folder) with the
automotive-part template published (tests/templates.py's: 8 items, enumeration, number, date,
URL), then, for --runs rounds in alternating order, registers --batches BatchCreates of 2000
fresh identifiers each, the same seven values per item:

* ``plain``: under 88.100.2, naming no template (nothing to check);
* ``templated``: under 88.100.1, naming the template (every item checked, all pass).

Reports registrations per second for each (one client, 2 calls in flight) and their ratio per
round (median, min, max): the target is at most 15% slower with templates. Prints JSON and
writes a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engine_bench import cpu_model
from bench.report import publish
from bench.templates import AUTOMOTIVE_PART
from nodes.hierarchy import NodeProcess, NodeSpec
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.template import REFERENCE_TYPE

BATCH = 2000


def items(prefix: str, start: int, templated: bool) -> list[tuple[str, list[Value]]]:
    out = []
    for n in range(start, start + BATCH):
        values = [
            Value(1, "partNumber", f"BRK-{n:07d}".encode()),
            Value(2, "partName", b"Brake disc, front"),
            Value(3, "material", b"steel"),
            Value(4, "weightKg", b"7.25"),
            Value(5, "productionDate", b"2026-11-30"),
            Value(6, "manufacturer", b"Hubei Parts Co."),
            Value(7, "datasheet", f"https://example.com/parts/{n}.pdf".encode()),
        ]
        if templated:
            values.append(Value(90, REFERENCE_TYPE, str(AUTOMOTIVE_PART.identifier).encode()))
        out.append((f"{prefix}/P-{n:07d}", values))
    return out


async def one_round(registrar: Registrar, templated: bool, batches: int, serial: int) -> float:
    """Registrations per second of ``batches`` BatchCreates, two in flight."""
    prefix = "88.100.1" if templated else "88.100.2"
    work = [items(prefix, serial + b * BATCH, templated) for b in range(batches)]
    started = time.perf_counter()
    pending: set[asyncio.Task[Any]] = set()
    for batch in work:
        if len(pending) >= 2:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending.add(asyncio.create_task(registrar.batch_create(batch, batch_size=BATCH)))
    results = await asyncio.gather(*pending)
    seconds = time.perf_counter() - started
    for outcomes in results:
        failed = [o for o in outcomes if o.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} items refused, e.g. {failed[0].error}")
    return batches * BATCH / seconds


async def measure(address: str, runs: int, batches: int) -> dict[str, list[float]]:
    registrar = Registrar(node=address, timeout=120)
    rates: dict[str, list[float]] = {"plain": [], "templated": []}
    try:
        for prefix in ("88.100.1", "88.100.2"):
            await registrar.create_prefix(prefix)
        await registrar.create(str(AUTOMOTIVE_PART.identifier), [AUTOMOTIVE_PART.value()])
        await one_round(registrar, True, 2, 10_000_000)  # warm up both paths
        await one_round(registrar, False, 2, 10_000_000)
        serial = 0
        for run in range(runs):
            for templated in (False, True) if run % 2 == 0 else (True, False):
                rate = await one_round(registrar, templated, batches, serial)
                serial += batches * BATCH
                rates["templated" if templated else "plain"].append(rate)
                print(
                    f"run {run + 1}/{runs} {'templated' if templated else 'plain'}: {rate:,.0f}/s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await registrar.close()
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10, help="BatchCreates of 2000 per round")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="idis-templates-") as tmp:
        state = Path(tmp)
        spec = NodeSpec(
            "secondary",
            "secondary",
            "88.100",
            0,
            {"quotas": {"peer_calls_per_second": 0, "peer_burst": 0}, "cache": {"enabled": True}},
        )
        (state / "secondary.toml").write_text(spec.config_text())
        node = NodeProcess(state / "secondary.toml", state / "secondary.log")
        try:
            rates = asyncio.run(measure(node.start(), args.runs, args.batches))
        finally:
            node.stop()
    ratios = [t / p for t, p in zip(rates["templated"], rates["plain"], strict=True)]
    report = {
        "cpu": cpu_model(),
        "runs": args.runs,
        "registrations_per_round": args.batches * BATCH,
        "median_per_s": {k: round(statistics.median(v)) for k, v in rates.items()},
        "templated_vs_plain": {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        },
        "all_runs": rates,
    }
    publish(report, args.out, "template_bench", lambda path: plot(rates, path), hidden=("all_runs",))


def plot(rates: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.boxplot([rates["plain"], rates["templated"]], tick_labels=["no template", "checked against its template"])
    ax.set_ylabel("registrations per second (BatchCreate of 2000)")
    ax.set_title("Template validation cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
