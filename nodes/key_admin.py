"""``idis-keys``: a node operator's commands for the zone keys its prefixes sign with
(verifiable resolution, docs/verifiable-resolution.md), run on the node's machine against the
key folder its config names ([signing] keys).

    idis-keys --config enterprise.toml show 88.100.1      the keys to hand to the parent
    idis-keys --config enterprise.toml roll 88.100.1 --overlap 86400
    idis-keys --config top.toml anchor 88                 the trust anchor file's text

After ``roll``, hand the new ``show`` output to the parent (``idis prefix delegate ... --zone-keys
FILE``): its delegation then lists both keys for the overlap, the running node signs with the
new key within a minute and re-signs what the old one signed at its next re-signing pass.
``--overlap 0`` revokes the old keys at once (answers signed with them stop verifying as soon as
the parent's new delegation is published and the node has re-signed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nodes.config import ConfigError, load_config
from nodes.trust.zone_keys import ZoneKeys
from resolver.attestation import anchor_text, keys_json
from resolver.errors import IdisError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idis-keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", "-c", type=Path, required=True, help="the node's TOML config file")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="the prefix's published keys, as a delegation request names them (JSON)")
    show.add_argument("prefix")
    roll = sub.add_parser("roll", help="add the prefix's next key and end the earlier ones after --overlap")
    roll.add_argument("prefix")
    roll.add_argument("--overlap", type=int, default=86_400, help="seconds both keys stay valid (0: revoke now)")
    anchor = sub.add_parser("anchor", help="the trust anchor file's text for the prefix (the apex's keys)")
    anchor.add_argument("prefix")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        keys = ZoneKeys(config.path(config.signing.keys))
        now = int(time.time())
        if args.command == "roll":
            if args.overlap < 0:
                raise ConfigError("--overlap must not be negative")
            key = keys.roll(args.prefix, now, args.overlap)
            print(
                f"{args.prefix}: signing with {key.kid} from now; earlier keys end in {args.overlap} s", file=sys.stderr
            )
        keys.signing(args.prefix, now)  # a prefix's first key is made when first needed
        published = keys.published(args.prefix, now)
        print(anchor_text(args.prefix, published) if args.command == "anchor" else keys_json(published))
    except (ConfigError, IdisError, OSError) as exc:
        print(f"idis-keys: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
