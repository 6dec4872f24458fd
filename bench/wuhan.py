"""idis-wuhan: the Wuhan top-level node's registrations (July 2020), at any scale, into a node.

    # offline, straight into a stopped node's database (initial loads); fastest
    # (SQLite or PostgreSQL, as the config says; PostgreSQL with COPY)
    idis-wuhan import --config state/enterprise-1.toml --registrations 1000000

    # online, through the registration API of a running node (BatchCreate, several in flight)
    idis-wuhan load --target 127.0.0.1:2643 --apex 88.100.1 --registrations 1000000

Both write the registrations of the model (bench.dataset.wuhan_model) that fall under the node's
apex (``--apex``, or the config's first apex; ``88`` takes all of them) and give the same
stored data: same keys, versions, values and prefix counts (timestamps are each write's own).
Both print a progress line and end with a JSON report: registrations, seconds, rate, bytes on
disk and bytes per registration (import), and the node's per-prefix counts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import multiprocessing as mp
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import AsyncResult, Pool
from pathlib import Path
from typing import Any, TypeVar

from bench.dataset import WuhanModel, registration_columns, registration_wire, wuhan_model
from nodes.authority import PrefixKind
from nodes.compression import RecordCompression
from nodes.config import load_config
from nodes.storage import PrefixRow, Transaction, open_store
from nodes.storage.postgres import PostgresStore
from resolver.channels import ChannelPool, ClientTLS
from resolver.identifier import parse_prefix
from resolver.registrar import Registrar
from resolver.signing import Signer

CHUNK = 20_000


_last_progress = 0.0


def progress(done: int, total: int, started: float) -> None:
    """A progress line on stderr, at most twice a second (and always at the end)."""
    global _last_progress
    now = time.monotonic()
    if done < total and now - _last_progress < 0.5:
        return
    _last_progress = now
    elapsed = max(1e-6, now - started)
    rate = done / elapsed
    eta = (total - done) / rate if rate else 0.0
    print(
        f"\r{done:>13,} / {total:,} registrations  {rate:10,.0f}/s  ETA {eta:6.0f} s ",
        end="",
        file=sys.stderr,
        flush=True,
    )


_compression: RecordCompression | None = None
J = TypeVar("J")
R = TypeVar("R")


def _load_dictionary(dictionary_id: int, data: bytes) -> None:
    """Pool initialiser: workers compress records with the database's dictionary themselves."""
    global _compression
    _compression = RecordCompression()
    _compression.add(dictionary_id, data)


def _wire_records(prefix_text: str, count: int, seed: int, start: int, stop: int) -> Iterator[tuple[str, bytes]]:
    """(key, wire form) of registrations [start, stop) of a prefix, as a node stores them."""
    return registration_wire(prefix_text, count, seed, start, stop, int(time.time()))


def _encoded_chunk(job: tuple[str, int, int, int, int]) -> tuple[str, list[str], list[bytes]]:
    """Runs in a worker process: the prefix's key, and the keys and stored forms of
    registrations [start, stop) of the prefix (columns: the writer inserts them as they are)."""
    prefix_text, count, start, stop, seed = job
    keys, wires = registration_columns(prefix_text, count, seed, start, stop, int(time.time()))
    stored = _compression.encode_many(wires) if _compression is not None else wires
    return parse_prefix(prefix_text).key, keys, stored


def dictionary_samples(model: WuhanModel, apex: str, seed: int, own: bool, wanted: int = 20_000) -> list[bytes]:
    """Records spread over every prefix (and over each prefix's range), to train the dictionary
    on: the first records alone would all come from one enterprise."""
    prefixes = model.prefixes_under(apex, own)
    each = max(1, wanted // max(1, len(prefixes)))
    samples = []
    for prefix in prefixes:
        count = model.counts[prefix]
        for serial in range(0, count, max(1, count // each)):
            samples += [wire for _, wire in _wire_records(prefix, count, seed, serial, serial + 1)]
    return samples


def _jobs(model: WuhanModel, apex: str, seed: int, own: bool) -> Iterator[tuple[str, int, int, int, int]]:
    for prefix in model.prefixes_under(apex, own):
        count = model.counts[prefix]
        for start in range(0, count, CHUNK):
            yield prefix, count, start, min(count, start + CHUNK), seed


def bounded_imap(pool: Pool, function: Callable[[J], R], jobs: Iterable[J], ahead: int) -> Iterator[R]:
    """``pool.imap(function, jobs)`` with at most ``ahead`` jobs given out and not yet taken back:
    results in order, and the memory they take bounded. ``imap`` itself keeps every result the
    workers finish; once they outran the writer (compiled records), a 444M import grew to 24 GB
    and was killed. A worker's exception comes out of ``.get()`` at its job's place and ends the
    iteration; jobs still out are left to the pool's ``terminate`` (leaving ``with Pool``)."""
    if ahead < 1:
        raise ValueError("ahead must be at least 1")
    pending: collections.deque[AsyncResult[R]] = collections.deque()
    for job in jobs:
        pending.append(pool.apply_async(function, (job,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def selected(model: WuhanModel, apex: str, own: bool) -> int:
    return sum(model.counts[p] for p in model.prefixes_under(apex, own))


async def import_offline(
    config_path: Path, total: int, apex: str | None, seed: int, processes: int, own: bool = True
) -> dict[str, Any]:
    config = load_config(config_path)
    apex = apex or config.authority.apexes[0]
    model = wuhan_model(total)
    wanted = selected(model, apex, own)
    # SQLite: no sync during an initial load (a failed one is started again); PostgreSQL: COPY.
    store = await open_store(config, synchronous="OFF")
    started = time.monotonic()
    done = 0
    try:

        async def create_prefixes(tx: Transaction) -> None:
            for prefix in model.prefixes_under(apex, own):
                if prefix != apex:
                    p = parse_prefix(prefix)
                    await tx.put_prefix(PrefixRow(p.key, p.display, PrefixKind.HOSTED, None, 0, 0))
            a = parse_prefix(apex)
            if await tx.get_prefix(a.key) is None:
                await tx.put_prefix(PrefixRow(a.key, a.display, PrefixKind.HOSTED, None, 0, 0))

        await store.write(create_prefixes)
        if not store.compression.current:
            await store.train_dictionary(dictionary_samples(model, apex, seed, own))
        current = store.compression.current
        dictionary = (current, store.compression.dictionary(current))
        with mp.get_context("spawn").Pool(processes, _load_dictionary, dictionary) as pool:
            chunks = bounded_imap(pool, _encoded_chunk, _jobs(model, apex, seed, own), 2 * processes + 2)
            for prefix_key, keys, stored in chunks:
                await store.insert_columns(keys, stored, {prefix_key: len(keys)})
                done += len(keys)
                progress(done, wanted, started)
        print(file=sys.stderr)
        seconds = time.monotonic() - started
        if isinstance(store, PostgresStore):
            return {**rate_of("import", done, seconds), **await store.footprint()}
    finally:
        await store.close()
    return report(config.database_path, done, seconds, "import")


def rate_of(how: str, done: int, seconds: float) -> dict[str, Any]:
    return {
        "how": how,
        "registrations": done,
        "seconds": round(seconds, 1),
        "registrations_per_s": round(done / seconds, 1) if seconds else None,
    }


def report(database: Path, done: int, seconds: float, how: str) -> dict[str, Any]:
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = db.execute("PRAGMA page_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
        total = db.execute("SELECT count(*) FROM identifiers").fetchone()[0]
    size = database.stat().st_size
    return {
        **rate_of(how, done, seconds),
        "identifiers_in_database": total,
        "database_bytes": size,
        "bytes_per_registration": round(pages / total, 1) if total else None,
    }


async def load_online(
    target: str,
    apex: str,
    total: int,
    seed: int,
    in_flight: int,
    own: bool = True,
    tls: ClientTLS | None = None,
    signer: Signer | None = None,
) -> dict[str, Any]:
    """Registers through a running node's API; over TLS and signed when ``tls``/``signer`` are
    given (as a node that requires them is reached)."""
    model = wuhan_model(total)
    wanted = selected(model, apex, own)
    registrar = Registrar(node=target, timeout=120, signer=signer, channels=ChannelPool(tls))
    started = time.monotonic()
    done = failed = 0
    try:
        for prefix in model.prefixes_under(apex, own):
            if prefix != apex:
                await registrar.create_prefix(prefix)
        items = model.registrations_under(apex, seed, own)
        pending: set[asyncio.Task[Any]] = set()

        async def send(batch: list[Any]) -> None:
            nonlocal done, failed
            outcomes = await registrar.batch_create(batch, batch_size=2000)
            done += len(batch)
            failed += sum(1 for o in outcomes if o.error is not None)
            progress(done, wanted, started)

        while True:
            batch = list(itertools.islice(items, 2000))
            if not batch:
                break
            if len(pending) >= in_flight:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(send(batch))
            pending.add(task)
        if pending:
            await asyncio.gather(*pending)
        print(file=sys.stderr)
    finally:
        await registrar.close()
    seconds = time.monotonic() - started
    return {**rate_of("load", done, seconds), "failed": failed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="idis-wuhan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="write straight into a stopped node's database")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 2,
        help="processes generating and encoding records",
    )
    q = sub.add_parser("load", help="register through a running node's API")
    q.add_argument("--target", required=True, metavar="HOST:PORT")
    q.add_argument("--in-flight", type=int, default=4, help="BatchCreate calls in flight")
    q.add_argument("--ca", type=Path, help="the CA of a TLS node (PEM)")
    q.add_argument("--identity", help="the administrator identity that signs the writes")
    q.add_argument("--key", type=Path, help="its private key (PEM)")
    for s in (p, q):
        s.add_argument("--registrations", type=int, default=100_000, help="the whole model's size (444M in 2020)")
        s.add_argument("--apex", help="only registrations under this prefix (default: the config's apex)")
        s.add_argument("--seed", type=int, default=1)
        s.add_argument(
            "--without-own-nodes",
            action="store_true",
            help="leave out the 25 enterprises that run their own node (load those there)",
        )
    args = parser.parse_args(argv)
    if args.command == "import":
        result = asyncio.run(
            import_offline(
                args.config, args.registrations, args.apex, args.seed, args.processes, not args.without_own_nodes
            )
        )
    else:
        tls = ClientTLS(args.ca) if args.ca else None
        signer = Signer.from_file(args.identity, args.key) if args.identity and args.key else None
        apex = args.apex or "88"
        result = asyncio.run(
            load_online(
                args.target,
                apex,
                args.registrations,
                args.seed,
                args.in_flight,
                not args.without_own_nodes,
                tls,
                signer,
            )
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
