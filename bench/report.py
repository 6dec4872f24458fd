"""How every bench script hands over its results: the JSON report and its plot written into the
output folder, the report printed on stdout with where the plot is."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def publish(
    report: dict[str, Any], out: Path, name: str, draw: Callable[[Path], None], hidden: tuple[str, ...] = ()
) -> None:
    """Writes ``out/NAME.json`` and the plot ``draw`` makes at ``out/NAME.png``, then prints the
    report (with its plot's path, without the ``hidden`` members: raw runs a person need not read)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    draw(out / f"{name}.png")
    report["plot"] = str(out / f"{name}.png")
    print(json.dumps({k: v for k, v in report.items() if k not in hidden}, indent=2))
