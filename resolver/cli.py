"""``idis``: resolve, register and administer identifiers from the command line.

The top-level node to start from is ``--root`` (repeatable), else ``$IDIS_ROOT``
(comma-separated), else 127.0.0.1:2641, where ``idis-local`` runs the top-level node.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio

from resolver.channels import ChannelPool, ClientTLS
from resolver.errors import IdisError, InvalidArgument, InvalidValue
from resolver.json_form import record_to_json, values_from_json
from resolver.record import DEFAULT_TTL, Record, Value
from resolver.registrar import BatchOutcome, Registrar
from resolver.resolver import Resolver, Trace
from resolver.signing import (
    DEFAULT_KEY_INDEX,
    PUBKEY_TYPE,
    Signer,
    generate_key,
    public_key_der,
    save_private_key,
)
from resolver.status import status_code_of

DEFAULT_ROOT = "127.0.0.1:2641"


def roots_of(args: argparse.Namespace) -> list[str]:
    if args.root:
        return list(args.root)
    env = os.environ.get("IDIS_ROOT", "")
    return [r.strip() for r in env.split(",") if r.strip()] or [DEFAULT_ROOT]


def parse_value_spec(spec: str, default_index: int, ttl: int) -> Value:
    """``[INDEX:]TYPE=DATA``, e.g. ``URL=https://example.com`` or ``2:EMAIL=ops@example.com``;
    ``TYPE=@FILE`` takes the data from a file (a public key, say)."""
    head, sep, data = spec.partition("=")
    if not sep:
        raise InvalidValue(f"value {spec!r} is not [INDEX:]TYPE=DATA")
    index_text, colon, type_ = head.rpartition(":")
    if not colon:
        index, type_ = default_index, head
    elif index_text.isdigit():
        index = int(index_text)
    else:
        raise InvalidValue(f"value {spec!r}: index {index_text!r} is not a number")
    payload = Path(data[1:]).read_bytes() if data.startswith("@") else data.encode("utf-8")
    return Value(index=index, type=type_, data=payload, ttl=ttl)


def read_items(path: Path) -> list[tuple[str, tuple[Value, ...]]]:
    """Items of a JSON Lines file (``{"identifier": ..., "values": [...]}`` per line) or of a CSV
    file with the columns ``identifier,type,data`` and optionally ``index,ttl`` (one value a row;
    rows of the same identifier form one record)."""
    with open(path, encoding="utf-8", newline="") as fh:
        if path.suffix.lower() == ".csv":
            return _items_from_csv(fh)
        return list(_items_from_jsonl(fh))


def _items_from_jsonl(fh: TextIO) -> Iterator[tuple[str, tuple[Value, ...]]]:
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"line {number}: not JSON: {exc.msg}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("identifier"), str):
            raise InvalidArgument(f'line {number}: expected {{"identifier": ..., "values": [...]}}')
        yield obj["identifier"], values_from_json(obj.get("values"), f"line {number}: values")


def _items_from_csv(fh: TextIO) -> list[tuple[str, tuple[Value, ...]]]:
    reader = csv.DictReader(fh)
    missing = {"identifier", "type", "data"} - set(reader.fieldnames or ())
    if missing:
        raise InvalidArgument(f"CSV header lacks the column(s) {', '.join(sorted(missing))}")
    records: dict[str, list[Value]] = {}
    for number, row in enumerate(reader, 2):
        values = records.setdefault(row["identifier"], [])
        try:
            index = int(row.get("index") or len(values) + 1)
            ttl = int(row.get("ttl") or DEFAULT_TTL)
        except ValueError as exc:
            raise InvalidArgument(f"CSV line {number}: index and ttl must be integers") from exc
        values.append(Value(index=index, type=row["type"], data=row["data"].encode("utf-8"), ttl=ttl))
    return [(ident, tuple(vals)) for ident, vals in records.items()]


# --- output ------------------------------------------------------------------------------------


def print_record(record: Record, out: TextIO) -> None:
    print(f"{record.identifier}  (version {record.version})", file=out)
    for v in record.values:
        print(f"  {v.index:>5}  {v.type:<16} {v.text()}  ttl={v.ttl}s", file=out)


def print_trace(trace: Trace, out: TextIO) -> None:
    for number, hop in enumerate(trace.hops, 1):
        where = "(cache)" if hop.server == "cache" else hop.server
        print(f"  {number:>2}  {where:<22} {hop.outcome:<60} {hop.elapsed * 1000:8.2f} ms", file=out)
    print(f"      {trace.network_hops} network hop(s)", file=out)


def _error_json(error: IdisError) -> dict[str, Any]:
    return {"status": status_code_of(error).name, "message": str(error)}


# --- commands ----------------------------------------------------------------------------------


async def cmd_resolve(args: argparse.Namespace, out: TextIO) -> int:
    failed = 0
    results: list[dict[str, Any]] = []
    async with _resolver(args) as resolver:
        for _round in range(args.repeat):
            for identifier in args.identifiers:
                trace = Trace() if args.trace else None
                try:
                    record = await resolver.resolve(identifier, trace)
                    entry: dict[str, Any] = record_to_json(record)
                except IdisError as error:
                    failed += 1
                    entry = {"identifier": identifier, "error": _error_json(error)}
                    record = None
                if args.trace and trace is not None:
                    entry["trace"] = [
                        {"server": h.server, "outcome": h.outcome, "ms": round(h.elapsed * 1000, 3)} for h in trace.hops
                    ]
                if args.json:
                    results.append(entry)
                    continue
                if record is not None:
                    print_record(record, out)
                else:
                    print(f"{identifier}: {entry['error']['status']}: {entry['error']['message']}", file=out)
                if trace is not None:
                    print_trace(trace, out)
    if args.json:
        json.dump(results[0] if len(results) == 1 else results, out, ensure_ascii=False, indent=2)
        print(file=out)
    return 1 if failed else 0


def signer_of(args: argparse.Namespace) -> Signer | None:
    """Who signs the writes: --identity/--key, else $IDIS_IDENTITY/$IDIS_KEY, else nobody."""
    identity = getattr(args, "identity", None) or os.environ.get("IDIS_IDENTITY")
    key = getattr(args, "key", None) or os.environ.get("IDIS_KEY")
    if not identity and not key:
        return None
    if not identity or not key:
        raise InvalidArgument("signing needs both an identity (--identity) and its key file (--key)")
    return Signer.from_file(identity, Path(key), getattr(args, "key_index", None) or DEFAULT_KEY_INDEX)


def tls_of(args: argparse.Namespace) -> ClientTLS | None:
    ca = getattr(args, "ca", None)
    return ClientTLS(ca) if ca else ClientTLS.from_environment()


def _resolver(args: argparse.Namespace) -> Resolver:
    return Resolver(roots_of(args), timeout=args.timeout, channels=ChannelPool(tls_of(args)))


def _registrar(args: argparse.Namespace) -> Registrar:
    return Registrar(
        _resolver(args),
        node=args.node,
        timeout=args.timeout,
        signer=signer_of(args),
        channels=ChannelPool(tls_of(args)),
    )


def _print_batch(outcomes: Sequence[BatchOutcome], as_json: bool, out: TextIO) -> int:
    created = sum(1 for o in outcomes if o.error is None and o.created)
    existed = sum(1 for o in outcomes if o.error is None and not o.created)
    failed = [o for o in outcomes if o.error is not None]
    if as_json:
        json.dump(
            {
                "created": created,
                "already_existed": existed,
                "failed": len(failed),
                "errors": [{"identifier": o.identifier, **_error_json(o.error)} for o in failed if o.error],
            },
            out,
            indent=2,
        )
        print(file=out)
    else:
        print(f"created {created}, already existed (identical) {existed}, failed {len(failed)}", file=out)
        for o in failed[:20]:
            assert o.error is not None
            print(f"  {o.identifier}: {status_code_of(o.error).name}: {o.error}", file=out)
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more", file=out)
    return 1 if failed else 0


async def cmd_register(args: argparse.Namespace, out: TextIO) -> int:
    registrar = _registrar(args)
    try:
        if args.file:
            items = read_items(args.file)
            outcomes = await registrar.batch_create(items, batch_size=args.batch_size)
            return _print_batch(outcomes, args.json, out)
        if not args.identifier or not args.value:
            raise InvalidArgument("give an identifier and at least one --value, or --file")
        values = [parse_value_spec(s, i + 1, args.ttl) for i, s in enumerate(args.value)]
        if args.replace:
            written = await registrar.replace(args.identifier, values, args.expected_version)
        else:
            written = await registrar.create(args.identifier, values)
        if args.json:
            json.dump({**record_to_json(written.record), "created": written.created}, out, ensure_ascii=False, indent=2)
            print(file=out)
        else:
            verb = "created" if written.created else ("replaced" if args.replace else "already existed (identical)")
            print(f"{verb}: {written.record.identifier} (version {written.record.version})", file=out)
        return 0
    finally:
        await registrar.close()


async def cmd_delete(args: argparse.Namespace, out: TextIO) -> int:
    registrar = _registrar(args)
    try:
        version = await registrar.delete(args.identifier, args.expected_version)
        print(f"deleted: {args.identifier} (was version {version})", file=out)
        return 0
    finally:
        await registrar.close()


async def cmd_prefix(args: argparse.Namespace, out: TextIO) -> int:
    registrar = _registrar(args)
    try:
        if args.prefix_command == "create":
            info = await registrar.create_prefix(args.prefix)
            print(f"hosted: {info.prefix}", file=out)
        elif args.prefix_command == "delegate":
            info = await registrar.delegate_prefix(args.prefix, args.server, args.ttl)
            print(f"delegated: {info.prefix} -> {', '.join(info.servers)} (ttl {info.ttl}s)", file=out)
        elif args.prefix_command == "list":
            infos = await registrar.list_prefixes(args.under or "")
            if args.json:
                json.dump([dataclasses.asdict(i) for i in infos], out, indent=2)
                print(file=out)
                return 0
            for i in infos:
                where = ", ".join(i.servers) if i.kind == "delegated" else f"{i.identifier_count} identifiers"
                print(f"  {i.prefix:<20} {i.kind:<10} {where}", file=out)
        else:
            for name in await registrar.list_identifiers(args.prefix, limit=args.limit):
                print(name, file=out)
        return 0
    finally:
        await registrar.close()


async def cmd_keygen(args: argparse.Namespace, out: TextIO) -> int:
    """Makes an Ed25519 key pair for an administrator and says how to register and trust it."""
    if args.out.exists():
        raise InvalidArgument(f"{args.out} exists; refusing to overwrite a key")
    key = generate_key()
    save_private_key(key, args.out)
    der = public_key_der(key)
    args.out.with_suffix(".pub").write_bytes(der)
    b64 = base64.b64encode(der).decode()
    print(f"private key: {args.out} (keep it secret)\npublic key:  {args.out.with_suffix('.pub')}", file=out)
    print(
        f"\nTrust it on the node that administers its prefix ([auth] in the node's config):\n"
        f'  trust = ["{args.identity}={b64}"]',
        file=out,
    )
    print(
        f"\nOr register it, signed by an administrator who may (HS_PUBKEY at index {args.index}):\n"
        f"  idis register {args.identity} --value {args.index}:{PUBKEY_TYPE}=@{args.out.with_suffix('.pub')}",
        file=out,
    )
    return 0


async def cmd_audit(args: argparse.Namespace, out: TextIO) -> int:
    registrar = _registrar(args)
    try:
        entries = await registrar.list_audit(args.prefix or "", args.identity_filter or "", args.limit)
    finally:
        await registrar.close()
    if args.json:
        json.dump([{f.name: getattr(e, f.name) for f in e.DESCRIPTOR.fields} for e in entries], out, indent=2)
        print(file=out)
        return 0
    for e in entries:
        when = dt.datetime.fromtimestamp(e.at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(
            f"{e.seq:>6} {when} {e.identity}#{e.key_index} {e.peer} {e.method} {e.target}: {e.result} {e.detail}",
            file=out,
        )
    return 0


async def cmd_health(args: argparse.Namespace, out: TextIO) -> int:
    """Asks a node's standard gRPC health service; exit status 0 only when SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tls = ClientTLS.from_environment() if args.ca is None else ClientTLS(args.ca)
    pool = ChannelPool(tls)
    channel = pool.get(args.address)
    try:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.aio.AioRpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=out)
            return 1
    finally:
        await pool.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{args.address}: {status}", file=out)
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idis", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", action="append", metavar="HOST:PORT", help="top-level node (repeatable)")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--ca", type=Path, help="CA certificate of the nodes' TLS (or $IDIS_CA); none: plaintext")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("resolve", parents=[common], help="resolve identifiers through the hierarchy")
    p.add_argument("identifiers", nargs="+", metavar="IDENTIFIER")
    p.add_argument("--trace", action="store_true", help="show every referral hop and its time")
    p.add_argument("--repeat", type=int, default=1, help="resolve N times (the cache answers after the first)")
    p.set_defaults(run=cmd_resolve)

    writer = argparse.ArgumentParser(add_help=False)
    writer.add_argument("--node", metavar="HOST:PORT", help="send to this node instead of locating it")
    writer.add_argument("--identity", help="the administrator signing the call (or $IDIS_IDENTITY)")
    writer.add_argument("--key", help="its private key file, from idis keygen (or $IDIS_KEY)")
    writer.add_argument("--key-index", type=int, help=f"index of its HS_PUBKEY (default {DEFAULT_KEY_INDEX})")
    writer.add_argument("--expected-version", type=int, default=0, help="fail unless the record is at this version")

    p = sub.add_parser("register", parents=[common, writer], help="create an identifier, or a batch from a file")
    p.add_argument("identifier", nargs="?")
    p.add_argument("--value", "-v", action="append", metavar="[INDEX:]TYPE=DATA", help="a value (repeatable)")
    p.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="TTL of the values given with --value")
    p.add_argument("--replace", action="store_true", help="replace the values of an existing identifier")
    p.add_argument("--file", "-f", type=Path, help="JSON Lines (.jsonl) or CSV (.csv) file of identifiers")
    p.add_argument("--batch-size", type=int, default=1000, help="identifiers per call, at most 2000")
    p.set_defaults(run=cmd_register)

    p = sub.add_parser("delete", parents=[common, writer], help="delete an identifier")
    p.add_argument("identifier")
    p.set_defaults(run=cmd_delete)

    p = sub.add_parser("prefix", help="create, delegate and list prefixes")
    psub = p.add_subparsers(dest="prefix_command", required=True)
    q = psub.add_parser("create", parents=[common, writer], help="host a prefix on the node of its parent")
    q.add_argument("prefix")
    q = psub.add_parser("delegate", parents=[common, writer], help="delegate a prefix to other servers")
    q.add_argument("prefix")
    q.add_argument("--server", action="append", required=True, metavar="HOST:PORT", help="repeatable")
    q.add_argument("--ttl", type=int, default=0, help="referral TTL in seconds (default 86400)")
    q = psub.add_parser("list", parents=[common, writer], help="list a node's prefixes")
    q.add_argument("under", nargs="?", help="only prefixes under this one")
    q = psub.add_parser("identifiers", parents=[common, writer], help="list identifiers under a hosted prefix")
    q.add_argument("prefix")
    q.add_argument("--limit", type=int, default=0)
    p.set_defaults(run=cmd_prefix)

    p = sub.add_parser("keygen", help="make an Ed25519 key for an administrator")
    p.add_argument("identity", help="the administrator's identifier, e.g. 88.100.1/ADMIN")
    p.add_argument("--out", type=Path, required=True, help="private key file to write (PEM); .pub next to it")
    p.add_argument("--index", type=int, default=DEFAULT_KEY_INDEX)
    p.set_defaults(run=cmd_keygen)

    p = sub.add_parser("audit", parents=[common, writer], help="the audit trail of a prefix or an identity")
    p.add_argument("--prefix")
    p.add_argument("--of", dest="identity_filter", metavar="IDENTITY", help="entries made by this identity")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(run=cmd_audit)

    p = sub.add_parser("health", help="is a node serving? (exit status 0 when it is)")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--service", default="", help="one service, e.g. idis.v1.Resolution (default: the node)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--ca", type=Path, help="CA certificate when the node speaks TLS (or $IDIS_CA)")
    p.set_defaults(run=cmd_health)
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stream = out or sys.stdout
    try:
        code: int = asyncio.run(args.run(args, stream))
    except IdisError as error:
        print(f"idis: {status_code_of(error).name}: {error}", file=sys.stderr)
        code = 1
    except (OSError, ValueError) as error:
        print(f"idis: {error}", file=sys.stderr)
        code = 2
    if out is None:
        sys.exit(code)
    return code
