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
import secrets
import sys
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio

from resolver.attestation import Validator, load_anchor
from resolver.channels import ChannelPool, ClientTLS
from resolver.errors import FailedPrecondition, IdisError, InvalidArgument, InvalidValue, NotFound
from resolver.handle_client import HandleClient, HandleResolver
from resolver.identifier import parse_identifier, shown
from resolver.json_form import record_to_json, values_from_json
from resolver.record import ADMIN_TYPE, DEFAULT_SECRET_INDEX, DEFAULT_TTL, SECKEY_TYPE, Record, Value
from resolver.registrar import BatchOutcome, Registrar
from resolver.resolver import Resolver, Trace
from resolver.signing import (
    DEFAULT_KEY_INDEX,
    PUBKEY_TYPE,
    Signer,
    generate_key,
    public_key_der,
    save_private_key,
    write_private,
)
from resolver.status import error_from_rpc, status_code_of
from resolver.template import Template, check, is_template_identifier, template_in, template_of_document

DEFAULT_ROOT = "127.0.0.1:2641"
DEFAULT_HANDLE_ROOT = "127.0.0.1:2651"
"""Where idis-local serves the top-level node's Handle protocol (UDP and TCP)."""

DESCRIPTION = """Resolve, register and administer identifiers of the industrial-internet identifier system.

The top-level node to start from is --root (repeatable), else IDIS_ROOT (comma-separated),
else 127.0.0.1:2641, where idis-local runs the top-level node. Writes are signed with
--identity and --key; nodes that speak TLS need --ca."""

ENVIRONMENT: tuple[tuple[str, str], ...] = (
    ("IDIS_ROOT", "top-level nodes, comma-separated, when no --root is given"),
    ("IDIS_CA", "CA certificate of the nodes' TLS, when no --ca is given (neither: plaintext)"),
    ("IDIS_CERT", "this client's certificate for nodes that require mutual TLS, when no --cert"),
    ("IDIS_CERT_KEY", "its private key, when no --cert-key is given"),
    ("IDIS_IDENTITY", "the administrator signing writes, when no --identity is given"),
    ("IDIS_KEY", "its private key file (from idis keygen), when no --key is given"),
    ("IDIS_ANCHOR", "trust anchor file: resolve validates every answer against it, when no --anchor"),
)
"""Every environment variable the CLI reads; each one stands in for the option named with it."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INVALID, EXIT_DENIED, EXIT_UNAVAILABLE = range(7)

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "failed otherwise: exists with other values, stale version, over a limit, node error"),
    (EXIT_USAGE, "usage error: unknown option, missing or conflicting arguments"),
    (EXIT_NOT_FOUND, "not found: no such identifier, value or prefix (NOT_FOUND)"),
    (EXIT_INVALID, "invalid input: malformed identifier, value or file (INVALID_ARGUMENT)"),
    (EXIT_DENIED, "denied: unsigned, badly signed or not permitted (UNAUTHENTICATED, PERMISSION_DENIED)"),
    (EXIT_UNAVAILABLE, "unavailable: no node answered in time, or not serving (UNAVAILABLE, DEADLINE_EXCEEDED)"),
)
"""What each exit status means; a command about several items exits with their failures' status
when they share one, else with EXIT_FAILED."""

_EXIT_OF_STATUS = {
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
}


def exit_code_of(error: IdisError) -> int:
    """The exit status for a command that failed with ``error``."""
    return _EXIT_OF_STATUS.get(status_code_of(error), EXIT_FAILED)


def exit_code_of_all(errors: Iterable[IdisError]) -> int:
    """EXIT_OK without errors; their shared exit status; EXIT_FAILED when they differ."""
    codes = {exit_code_of(error) for error in errors}
    if not codes:
        return EXIT_OK
    return codes.pop() if len(codes) == 1 else EXIT_FAILED


def epilog() -> str:
    """The environment variables and exit statuses, as plain-text tables for --help."""
    lines = ["environment variables:"]
    lines += [f"  {name:<15}{meaning}" for name, meaning in ENVIRONMENT]
    lines += ["", "exit status:"]
    lines += [f"  {code:<3}{meaning}" for code, meaning in EXIT_CODES]
    return "\n".join(lines)


class UsageError(Exception):
    """The command line is incomplete or contradicts itself (exit status EXIT_USAGE)."""


def version() -> str:
    try:
        return metadata.version("idis")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


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
    return [(identifier, values) for _, identifier, values in read_numbered_items(path)]


def read_numbered_items(path: Path) -> list[tuple[int, str, tuple[Value, ...]]]:
    """``read_items``, each with the line it starts on (so that a fault can be shown there)."""
    with open(path, encoding="utf-8", newline="") as fh:
        if path.suffix.lower() == ".csv":
            return _items_from_csv(fh)
        return list(_items_from_jsonl(fh))


def _items_from_jsonl(fh: TextIO) -> Iterator[tuple[int, str, tuple[Value, ...]]]:
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"line {number}: not JSON: {exc.msg}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("identifier"), str):
            raise InvalidArgument(f'line {number}: expected {{"identifier": ..., "values": [...]}}')
        yield number, obj["identifier"], values_from_json(obj.get("values"), f"line {number}: values")


def _items_from_csv(fh: TextIO) -> list[tuple[int, str, tuple[Value, ...]]]:
    reader = csv.DictReader(fh)
    missing = {"identifier", "type", "data"} - set(reader.fieldnames or ())
    if missing:
        raise InvalidArgument(f"CSV header lacks the column(s) {', '.join(sorted(missing))}")
    records: dict[str, list[Value]] = {}
    first: dict[str, int] = {}
    for number, row in enumerate(reader, 2):
        values = records.setdefault(row["identifier"], [])
        first.setdefault(row["identifier"], number)
        try:
            index = int(row.get("index") or len(values) + 1)
            ttl = int(row.get("ttl") or DEFAULT_TTL)
        except ValueError as exc:
            raise InvalidArgument(f"CSV line {number}: index and ttl must be integers") from exc
        values.append(Value(index=index, type=row["type"], data=row["data"].encode("utf-8"), ttl=ttl))
    return [(first[ident], ident, tuple(vals)) for ident, vals in records.items()]


# --- output ------------------------------------------------------------------------------------


def _escaped(text: str) -> str:
    """Text in an escaped syntax already (JSON, an audit row) as it is when it is printable ASCII,
    else ``shown``: escaped, so nothing in it prints like something else."""
    return text if text.isascii() and text.isprintable() else shown(text)


def print_record(record: Record, out: TextIO) -> None:
    """The record as text. Identities are shown unambiguously (``shown``: a look-alike such as
    ``88.100.1/\\u0410DMIN`` never prints like ``88.100.1/ADMIN``): an identifier holding a key,
    and the administrators its HS_ADMIN values (JSON) name."""
    identity = any(v.type == PUBKEY_TYPE for v in record.values)
    name = shown(str(record.identifier)) if identity else str(record.identifier)
    # Version 0: unknown (the Handle protocol carries none); a stored record's is 1 or more.
    print(f"{name}  (version {record.version})" if record.version else name, file=out)
    for v in record.values:
        text = _escaped(v.text()) if v.type == ADMIN_TYPE else v.text()
        print(f"  {v.index:>5}  {v.type:<16} {text}  ttl={v.ttl}s", file=out)


def print_trace(trace: Trace, out: TextIO) -> None:
    for number, hop in enumerate(trace.hops, 1):
        where = "(cache)" if hop.server == "cache" else hop.server
        print(f"  {number:>2}  {where:<22} {hop.outcome:<60} {hop.elapsed * 1000:8.2f} ms", file=out)
    print(f"      {trace.network_hops} network hop(s)", file=out)
    if trace.chain:
        print("      verified, from the trust anchor down:", file=out)
        for step in trace.chain:
            print(f"        {step.prefix:<24} {', '.join(step.keys):<40} by {step.by}", file=out)


def _error_json(error: IdisError) -> dict[str, Any]:
    """An error as --json shows it: status and message, and what the node's google.rpc details
    said (a stable reason, the field at fault, how long to wait before retrying)."""
    document: dict[str, Any] = {"status": status_code_of(error).name, "reason": error.reason, "message": str(error)}
    if error.field:
        document["field"] = error.field
    if error.retry_after:
        document["retry_after_ms"] = int(error.retry_after * 1000) + 1
    if error.violations:
        document["violations"] = [{"item": item, "description": why} for item, why in error.violations]
    return document


def print_json(document: Any, out: TextIO) -> None:
    """The output of a command run with --json: one JSON document."""
    json.dump(document, out, ensure_ascii=False, indent=2)
    print(file=out)


# --- commands ----------------------------------------------------------------------------------


class _HandleResolving:
    """``idis resolve --protocol handle-udp|handle-tcp``: the Handle-protocol resolver, used
    like the gRPC one."""

    def __init__(self, args: argparse.Namespace) -> None:
        roots = list(args.root) if args.root else [DEFAULT_HANDLE_ROOT]
        client = HandleClient(args.protocol.removeprefix("handle-"), timeout=min(args.timeout, 5.0))
        self.resolver = HandleResolver(roots, client)

    async def __aenter__(self) -> HandleResolver:
        return self.resolver

    async def __aexit__(self, *exc: object) -> None:
        return None


async def cmd_resolve(args: argparse.Namespace, out: TextIO) -> int:
    failed: list[IdisError] = []
    results: list[dict[str, Any]] = []
    if args.protocol != "grpc" and validator_of(args) is not None:
        raise UsageError(
            f"answers over {args.protocol} are not signed: validation (--verify, --anchor, IDIS_ANCHOR) needs"
            " --protocol grpc (or --no-verify)"
        )
    resolving = _resolver(args) if args.protocol == "grpc" else _HandleResolving(args)
    async with resolving as resolver:
        for _round in range(args.repeat):
            for identifier in args.identifiers:
                trace = Trace() if args.trace else None
                try:
                    record = await resolver.resolve(identifier, trace)
                    entry: dict[str, Any] = record_to_json(record)
                except IdisError as error:
                    failed.append(error)
                    entry = {"identifier": identifier, "error": _error_json(error)}
                    record = None
                if args.trace and trace is not None:
                    entry["trace"] = [
                        {"server": h.server, "outcome": h.outcome, "ms": round(h.elapsed * 1000, 3)} for h in trace.hops
                    ]
                    if trace.chain:
                        entry["verified"] = [{"prefix": c.prefix, "keys": c.keys, "by": c.by} for c in trace.chain]
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
        print_json(results[0] if len(results) == 1 else results, out)
    return exit_code_of_all(failed)


def signer_of(args: argparse.Namespace) -> Signer | None:
    """Who signs the writes: --identity/--key, else $IDIS_IDENTITY/$IDIS_KEY, else nobody."""
    identity = getattr(args, "identity", None) or os.environ.get("IDIS_IDENTITY")
    key = getattr(args, "key", None) or os.environ.get("IDIS_KEY")
    if not identity and not key:
        return None
    if not identity or not key:
        raise UsageError("signing needs both an identity (--identity) and its key file (--key)")
    return Signer.from_file(identity, Path(key), getattr(args, "key_index", None) or DEFAULT_KEY_INDEX)


def tls_of(args: argparse.Namespace) -> ClientTLS | None:
    """TLS from --ca, --cert and --cert-key, each else its variable (IDIS_CA, IDIS_CERT,
    IDIS_CERT_KEY), so a CA given on the command line combines with a client certificate from
    the environment; no CA: plaintext."""
    ca = args.ca or os.environ.get("IDIS_CA")
    cert = args.cert or os.environ.get("IDIS_CERT")
    key = args.cert_key or os.environ.get("IDIS_CERT_KEY")
    if bool(cert) != bool(key):
        raise UsageError("mutual TLS needs both a client certificate (--cert) and its key (--cert-key)")
    if not ca:
        if cert:
            raise UsageError("a client certificate needs the nodes' CA too (--ca or IDIS_CA)")
        return None
    return ClientTLS(Path(ca), Path(cert) if cert else None, Path(key) if key else None)


def validator_of(args: argparse.Namespace) -> Validator | None:
    """Validation against --anchor, else IDIS_ANCHOR (--verify requires one; --no-verify: none)."""
    if getattr(args, "no_verify", False):
        return None
    anchor = getattr(args, "anchor", None) or os.environ.get("IDIS_ANCHOR")
    if not anchor:
        if getattr(args, "verify", False):
            raise UsageError("--verify needs a trust anchor file (--anchor or IDIS_ANCHOR)")
        return None
    try:
        return Validator(load_anchor(anchor))
    except IdisError as exc:
        raise UsageError(str(exc)) from exc


def _resolver(args: argparse.Namespace) -> Resolver:
    return Resolver(
        roots_of(args), timeout=args.timeout, channels=ChannelPool(tls_of(args)), validator=validator_of(args)
    )


def _registrar(args: argparse.Namespace) -> Registrar:
    return Registrar(
        _resolver(args),
        node=args.node,
        timeout=args.timeout,
        signer=signer_of(args),
        channels=ChannelPool(tls_of(args)),
    )


def _print_batch(
    outcomes: Sequence[BatchOutcome], as_json: bool, out: TextIO, lines: dict[str, int] | None = None
) -> int:
    """A batch's outcome; with ``lines`` (where each item starts in its file), every refused item
    with its line and each of its faults."""
    lines = lines or {}
    created = sum(1 for o in outcomes if o.error is None and o.created)
    existed = sum(1 for o in outcomes if o.error is None and not o.created)
    failed = [o for o in outcomes if o.error is not None]
    if as_json:
        print_json(
            {
                "created": created,
                "already_existed": existed,
                "failed": len(failed),
                "errors": [
                    {
                        "identifier": o.identifier,
                        **({"line": lines[o.identifier]} if o.identifier in lines else {}),
                        **_error_json(o.error),
                    }
                    for o in failed
                    if o.error
                ],
            },
            out,
        )
    else:
        print(f"created {created}, already existed (identical) {existed}, failed {len(failed)}", file=out)
        for o in failed[: None if lines else 20]:
            assert o.error is not None
            where = f"line {lines[o.identifier]}: " if o.identifier in lines else ""
            print(f"  {where}{o.identifier}: {status_code_of(o.error).name}: {o.error}", file=out)
            for item, why in o.error.violations:
                print(f"      {item}: {why}", file=out)
        if len(failed) > 20 and not lines:
            print(f"  ... and {len(failed) - 20} more", file=out)
    return exit_code_of_all(o.error for o in failed if o.error is not None)


async def cmd_register(args: argparse.Namespace, out: TextIO) -> int:
    registrar = _registrar(args)
    try:
        if args.file:
            numbered = read_numbered_items(args.file)
            items = [(identifier, values) for _, identifier, values in numbered]
            outcomes = await registrar.batch_create(items, batch_size=args.batch_size)
            return _print_batch(outcomes, args.json, out, {identifier: line for line, identifier, _ in numbered})
        if not args.identifier or not args.value:
            raise UsageError("give an identifier and at least one --value, or --file")
        values = [parse_value_spec(s, i + 1, args.ttl) for i, s in enumerate(args.value)]
        if args.replace:
            written = await registrar.replace(args.identifier, values, args.expected_version)
        else:
            written = await registrar.create(args.identifier, values)
        if args.json:
            print_json({**record_to_json(written.record), "created": written.created}, out)
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
        if args.json:
            print_json({"identifier": args.identifier, "deleted": True, "version": version}, out)
        else:
            print(f"deleted: {args.identifier} (was version {version})", file=out)
        return 0
    finally:
        await registrar.close()


async def cmd_prefix(args: argparse.Namespace, out: TextIO) -> int:
    registrar = _registrar(args)
    try:
        if args.prefix_command in ("create", "delegate", "remove"):
            if args.prefix_command == "create":
                info = await registrar.create_prefix(args.prefix)
                text = f"hosted: {info.prefix}"
            elif args.prefix_command == "remove":
                info = await registrar.remove_prefix(args.prefix)
                text = f"removed: {info.prefix} (was {info.kind})"
            else:
                zone_keys = await asyncio.to_thread(Path(args.zone_keys).read_text, "utf-8") if args.zone_keys else ""
                info = await registrar.delegate_prefix(args.prefix, args.server, args.ttl, zone_keys=zone_keys)
                text = f"delegated: {info.prefix} -> {', '.join(info.servers)} (ttl {info.ttl}s)"
            if args.json:
                print_json(dataclasses.asdict(info), out)
            else:
                print(text, file=out)
        elif args.prefix_command == "list":
            infos = await registrar.list_prefixes(args.under or "", limit=args.limit)
            if args.json:
                print_json([dataclasses.asdict(i) for i in infos], out)
                return 0
            for i in infos:
                where = ", ".join(i.servers) if i.kind == "delegated" else f"{i.identifier_count} identifiers"
                print(f"  {i.prefix:<20} {i.kind:<10} {where}", file=out)
        else:
            _print_names(await registrar.list_identifiers(args.prefix, limit=args.limit), args.json, out)
        return 0
    finally:
        await registrar.close()


def _print_names(names: Sequence[str], as_json: bool, out: TextIO) -> None:
    if as_json:
        print_json(list(names), out)
    else:
        for name in names:
            print(name, file=out)


async def cmd_template(args: argparse.Namespace, out: TextIO) -> int:
    """Metadata templates: publish one from a JSON file, show one, list a prefix's, or check a
    registration file (JSON Lines or CSV) against one, every fault with its line."""
    if args.template_command == "validate":
        template = await _template_from(args, args.template)
        return _validate_file(template, Path(args.file), args.json, out)
    if args.template_command == "show":
        template = await _template_from(args, args.identifier)
        if args.json:
            print_json({"identifier": str(template.identifier), **json.loads(template.to_json())}, out)
        else:
            industry = template.industry
            code = "/".join(c for c in (industry.category, industry.division, industry.group, industry.klass) if c)
            print(f"{template.identifier}  industry {code}  {template.description}", file=out)
            for item in template.items:
                shown_item = json.dumps(
                    {k: v for k, v in dataclasses.asdict(item).items() if v not in ("", 0, None, ())}
                )
                print(f"  {shown_item}", file=out)
        return 0
    registrar = _registrar(args)
    try:
        if args.template_command == "create":
            template = template_of_document(json.loads(await asyncio.to_thread(Path(args.file).read_text, "utf-8")))
            identifier = template.identifier
            written = await registrar.create(str(identifier), [template.value()])
            verb = "published" if written.created else "already published (identical)"
            if args.json:
                print_json({"identifier": str(identifier), "created": written.created}, out)
            else:
                print(f"{verb}: {identifier}", file=out)
        else:
            names = await registrar.list_identifiers(args.prefix)
            _print_names([n for n in names if is_template_identifier(parse_identifier(n))], args.json, out)
        return 0
    finally:
        await registrar.close()


async def _template_from(args: argparse.Namespace, where: str) -> Template:
    """A template from a JSON file (with its "prefix"), or resolved by its identifier."""
    path = Path(where)
    if path.suffix.lower() == ".json" and await asyncio.to_thread(path.exists):
        return template_of_document(json.loads(await asyncio.to_thread(path.read_text, "utf-8")))
    identifier = parse_identifier(where)
    async with _resolver(args) as resolver:
        record = await resolver.resolve(str(identifier))
    if not isinstance(record, Record):
        raise NotFound(f"template {identifier} not found")
    return template_in(identifier, record.values)


def _validate_file(template: Template, path: Path, as_json: bool, out: TextIO) -> int:
    """Checks every item of a registration file against ``template`` (offline)."""
    faults = []
    items = read_numbered_items(path)
    for line, identifier, values in items:
        for item, why in check(template, values):
            faults.append({"line": line, "identifier": identifier, "item": item, "description": why})
    if as_json:
        print_json({"template": str(template.identifier), "items": len(items), "faults": faults}, out)
    else:
        for f in faults:
            print(f"line {f['line']}: {f['identifier']}: {f['item']}: {f['description']}", file=out)
        bad = len({f["line"] for f in faults})
        print(f"{len(items) - bad} of {len(items)} items follow {template.identifier}; {bad} do not", file=out)
    return EXIT_INVALID if faults else EXIT_OK


async def cmd_keygen(args: argparse.Namespace, out: TextIO) -> int:
    """Makes an Ed25519 key pair for an administrator and says how to register and trust it."""
    if args.out.exists():
        raise FailedPrecondition(f"{args.out} exists; refusing to overwrite a key")
    key = generate_key()
    save_private_key(key, args.out)
    der = public_key_der(key)
    public = args.out.with_suffix(".pub")
    public.write_bytes(der)
    trust = f"{args.identity}={base64.b64encode(der).decode()}"
    register = f"idis register {args.identity} --value {args.index}:{PUBKEY_TYPE}=@{public}"
    if args.json:
        keys = {"identity": args.identity, "private_key": str(args.out), "public_key": str(public)}
        print_json({**keys, "index": args.index, "trust": trust, "register": register}, out)
        return 0
    print(f"private key: {args.out} (keep it secret)\npublic key:  {public}", file=out)
    print(
        f'\nTrust it on the node that administers its prefix ([auth] in the node\'s config):\n  trust = ["{trust}"]',
        file=out,
    )
    print(
        f"\nOr register it, signed by an administrator who may (HS_PUBKEY at index {args.index}):\n  {register}",
        file=out,
    )
    return 0


SECRET_BYTES = 24
"""Random bytes of a generated secret key (32 characters of URL-safe base64)."""


def _read_secret(path: str) -> bytes:
    """A secret from a file (``-``: standard input), without its trailing newline."""
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise UsageError(f"{path}: the secret is empty")
    return secret


def _write_secret_file(path: Path, secret: bytes) -> Path:
    """Writes ``secret`` owner-only next to ``path`` (``.new``), to be renamed over it once the
    node holds it: a failed call leaves the old file as it was."""
    fresh = path.with_name(path.name + ".new")
    write_private(fresh, secret + b"\n")
    return fresh


async def cmd_secret(args: argparse.Namespace, out: TextIO) -> int:
    """Sets (from a file) or rotates (a new random one, written to a file) an administrator's
    secret key: the HS_SECKEY value that HTTP Basic clients such as pyhandle log in with. The
    node stores it sealed and never shows it again."""
    fresh: Path | None = None
    if args.secret_command == "rotate":
        secret = secrets.token_urlsafe(SECRET_BYTES).encode()
        fresh = _write_secret_file(args.out, secret)
    else:
        secret = _read_secret(args.secret_file)
    registrar = _registrar(args)
    value = Value(args.index, SECKEY_TYPE, secret)
    try:
        written = await registrar.put_value(args.owner, value)
    except BaseException:
        if fresh is not None:
            fresh.unlink(missing_ok=True)
        raise
    finally:
        await registrar.close()
    if fresh is not None:
        fresh.replace(args.out)
    where = f"{args.index}:{written.record.identifier}"
    if args.json:
        saved = {"file": str(args.out)} if fresh is not None else {}
        print_json({"identity": where, "version": written.record.version, **saved}, out)
    else:
        saved_text = f"; the new secret is in {args.out}" if fresh is not None else ""
        print(f"secret key set: {where} (version {written.record.version}){saved_text}", file=out)
    return 0


async def cmd_audit(args: argparse.Namespace, out: TextIO) -> int:
    registrar = _registrar(args)
    try:
        entries = await registrar.list_audit(args.prefix or "", args.identity_filter or "", args.limit)
    finally:
        await registrar.close()
    if args.json:
        print_json([{f.name: getattr(e, f.name) for f in e.DESCRIPTOR.fields} for e in entries], out)
        return 0
    for e in entries:
        when = dt.datetime.fromtimestamp(e.at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # A node records these shown (printable ASCII); one that did not is shown here.
        identity, target, detail = (_escaped(t) for t in (e.identity, e.target, e.detail))
        print(f"{e.seq:>6} {when} {identity}#{e.key_index} {e.peer} {e.method} {target}: {e.result} {detail}", file=out)
    return 0


async def cmd_health(args: argparse.Namespace, out: TextIO) -> int:
    """Asks a node's standard gRPC health service; exit status 0 only when SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    pool = ChannelPool(tls_of(args))
    channel = pool.get(args.address)
    try:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
        )
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc, args.address) from exc
    finally:
        await pool.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    if args.json:
        print_json({"address": args.address, "service": args.service, "status": status}, out)
    else:
        print(f"{args.address}: {status}", file=out)
    return EXIT_OK if answer.status == health_pb2.HealthCheckResponse.SERVING else EXIT_UNAVAILABLE


def _command(
    sub: Any, name: str, help: str, run: Any, parents: Sequence[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with the environment and exit-status tables too."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        parents=list(parents),
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if run is not None:
        parser.set_defaults(run=run)
    return parser


def _option_groups() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """The options shared by commands: output and TLS (every command that calls a node), the
    hierarchy to ask (commands that resolve), signing (commands that may write)."""
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="machine-readable output: one JSON document")
    output.add_argument("--ca", help="CA certificate of the nodes' TLS (else IDIS_CA; neither: plaintext)")
    output.add_argument("--cert", help="client certificate for mutual TLS (else IDIS_CERT)")
    output.add_argument("--cert-key", help="its private key (else IDIS_CERT_KEY)")
    common = argparse.ArgumentParser(add_help=False, parents=[output])
    common.add_argument("--root", action="append", metavar="HOST:PORT", help="top-level node (repeatable)")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    writer = argparse.ArgumentParser(add_help=False)
    writer.add_argument("--node", metavar="HOST:PORT", help="send to this node instead of locating it")
    writer.add_argument("--identity", help="the administrator signing the call (else IDIS_IDENTITY)")
    writer.add_argument("--key", help="its private key file, from idis keygen (else IDIS_KEY)")
    writer.add_argument("--key-index", type=int, help=f"index of its HS_PUBKEY (default {DEFAULT_KEY_INDEX})")
    writer.add_argument("--expected-version", type=int, default=0, help="fail unless the record is at this version")
    return output, common, writer


def _identifier_commands(sub: Any, common: argparse.ArgumentParser, writer: argparse.ArgumentParser) -> None:
    p = _command(sub, "resolve", "resolve identifiers through the hierarchy", cmd_resolve, [common])
    p.add_argument("identifiers", nargs="+", metavar="IDENTIFIER")
    p.add_argument("--trace", action="store_true", help="show every referral hop and its time")
    p.add_argument("--repeat", type=int, default=1, help="resolve N times (the cache answers after the first)")
    p.add_argument(
        "--anchor", help="trust anchor file: every answer must chain up to it or is refused (else IDIS_ANCHOR)"
    )
    p.add_argument("--verify", action="store_true", help="require validation (fails without a trust anchor)")
    p.add_argument("--no-verify", action="store_true", help="do not validate, even with IDIS_ANCHOR set")
    p.add_argument(
        "--protocol",
        choices=("grpc", "handle-udp", "handle-tcp"),
        default="grpc",
        help="grpc (default), or the Handle protocol over UDP or TCP (then --root is the top-level"
        f" node's Handle port, default {DEFAULT_HANDLE_ROOT})",
    )

    p = _command(sub, "register", "create an identifier, or a batch from a file", cmd_register, [common, writer])
    p.add_argument("identifier", nargs="?")
    p.add_argument("--value", "-v", action="append", metavar="[INDEX:]TYPE=DATA", help="a value (repeatable)")
    p.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="TTL of the values given with --value")
    p.add_argument("--replace", action="store_true", help="replace the values of an existing identifier")
    p.add_argument("--file", "-f", type=Path, help="JSON Lines (.jsonl) or CSV (.csv) file of identifiers")
    p.add_argument("--batch-size", type=int, default=1000, help="identifiers per call, at most 2000")

    p = _command(sub, "delete", "delete an identifier", cmd_delete, [common, writer])
    p.add_argument("identifier")


def _prefix_commands(sub: Any, common: argparse.ArgumentParser, writer: argparse.ArgumentParser) -> None:
    p = _command(sub, "prefix", "create, delegate, remove and list prefixes", cmd_prefix, [])
    psub = p.add_subparsers(dest="prefix_command", required=True)
    q = _command(psub, "create", "host a prefix on the node of its parent", None, [common, writer])
    q.add_argument("prefix")
    q = _command(psub, "delegate", "delegate a prefix to other servers", None, [common, writer])
    q.add_argument("prefix")
    q.add_argument(
        "--zone-keys",
        metavar="FILE",
        help="the keys the site signs the prefix with (what idis-keys show prints on its node); a signing"
        " parent lists them in its signed delegation, and the prefix's answers verify only with them",
    )
    q.add_argument(
        "--server",
        action="append",
        required=True,
        metavar="HOST:PORT[+handle:PORT][+https:PORT]",
        help="a server: its gRPC address, then its Handle and HTTPS ports if it has them (repeatable)",
    )
    q.add_argument("--ttl", type=int, default=0, help="referral TTL in seconds (default 86400)")
    q = _command(
        psub,
        "remove",
        "stop hosting or delegating a prefix (no identifiers or sub-prefixes left)",
        None,
        [common, writer],
    )
    q.add_argument("prefix")
    q = _command(psub, "list", "list a node's prefixes", None, [common, writer])
    q.add_argument("under", nargs="?", help="only prefixes under this one")
    q.add_argument("--limit", type=int, default=0, help="at most this many (default 0: all)")
    q = _command(psub, "identifiers", "list identifiers under a hosted prefix", None, [common, writer])
    q.add_argument("prefix")
    q.add_argument("--limit", type=int, default=0, help="at most this many (default 0: all)")


def _template_commands(sub: Any, common: argparse.ArgumentParser, writer: argparse.ArgumentParser) -> None:
    p = _command(sub, "template", "publish, show, list and check against metadata templates", cmd_template, [])
    tsub = p.add_subparsers(dest="template_command", required=True)
    q = _command(
        tsub, "create", "publish a template (a JSON file with its prefix, name and version)", None, [common, writer]
    )
    q.add_argument("file", metavar="FILE")
    q = _command(tsub, "show", "show a template", None, [common])
    q.add_argument("identifier", metavar="IDENTIFIER|FILE")
    q = _command(tsub, "list", "list the templates of a prefix", None, [common, writer])
    q.add_argument("prefix")
    q = _command(tsub, "validate", "check a registration file (JSON Lines or CSV) against a template", None, [common])
    q.add_argument("file", metavar="FILE")
    q.add_argument("--template", required=True, metavar="IDENTIFIER|FILE", help="the template, resolved or from a file")


def _admin_commands(
    sub: Any, output: argparse.ArgumentParser, common: argparse.ArgumentParser, writer: argparse.ArgumentParser
) -> None:
    json_only = argparse.ArgumentParser(add_help=False)
    json_only.add_argument("--json", action="store_true", help="machine-readable output: one JSON document")
    p = _command(sub, "keygen", "make an Ed25519 key for an administrator", cmd_keygen, [json_only])
    p.add_argument("identity", help="the administrator's identifier, e.g. 88.100.1/ADMIN")
    p.add_argument("--out", type=Path, required=True, help="private key file to write (PEM); .pub next to it")
    p.add_argument("--index", type=int, default=DEFAULT_KEY_INDEX, help="index of its HS_PUBKEY value")

    p = _command(sub, "secret", "set or rotate an administrator's secret key (HTTP Basic)", cmd_secret, [])
    ssub = p.add_subparsers(dest="secret_command", required=True)
    for name, text in [("set", "set it from a file"), ("rotate", "replace it with a new random one")]:
        q = _command(ssub, name, f"{text} (HS_SECKEY, stored sealed)", None, [common, writer])
        # dest "owner": --identity is the administrator signing the call, who may be another one
        q.add_argument("owner", metavar="IDENTITY", help="whose secret key, e.g. 88.100.1/ADMIN")
        q.add_argument("--index", type=int, default=DEFAULT_SECRET_INDEX, help="index of its HS_SECKEY value")
        if name == "set":
            q.add_argument("--secret-file", required=True, metavar="FILE", help="the secret (- : standard input)")
        else:
            q.add_argument("--out", type=Path, required=True, help="file to write the new secret to (owner-only)")

    p = _command(sub, "audit", "the audit trail of a prefix or an identity", cmd_audit, [common, writer])
    p.add_argument("--prefix", help="entries about this prefix and the identifiers under it")
    p.add_argument("--of", dest="identity_filter", metavar="IDENTITY", help="entries made by this identity")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100; 0: all)")

    p = _command(sub, "health", "is a node serving? (exit status 0 when it is)", cmd_health, [output])
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--service", default="", help="one service, e.g. idis.v1.Resolution (default: the node)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default 3)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idis", description=DESCRIPTION, epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"idis {version()}")
    output, common, writer = _option_groups()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _identifier_commands(sub, common, writer)
    _prefix_commands(sub, common, writer)
    _template_commands(sub, common, writer)
    _admin_commands(sub, output, common, writer)
    return parser


def report_failure(error: IdisError, args: argparse.Namespace, out: TextIO) -> int:
    """Says why a command failed (on ``out`` as JSON with --json, else on stderr); its exit status."""
    if args.json:
        print_json({"error": _error_json(error)}, out)
    else:
        print(f"idis: {status_code_of(error).name}: {error}", file=sys.stderr)
    return exit_code_of(error)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Runs one command; its exit status (see EXIT_CODES), or exits with it when ``out`` is None."""
    args = build_parser().parse_args(argv)
    stream = out or sys.stdout
    try:
        code: int = asyncio.run(args.run(args, stream))
    except UsageError as wrong:
        print(f"idis {args.command}: error: {wrong}", file=sys.stderr)
        code = EXIT_USAGE
    except (IdisError, OSError, ValueError) as failure:
        code = report_failure(
            failure if isinstance(failure, IdisError) else InvalidArgument(str(failure)), args, stream
        )
    if out is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
