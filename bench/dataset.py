"""Deterministic synthetic registrations: the same seed gives the same identifiers and values."""

from __future__ import annotations

import random
from collections.abc import Iterator

from resolver.record import Value

CLASSES = ["MOTOR", "PUMP", "VALVE", "BEARING", "SENSOR", "CABLE", "GEAR", "PANEL"]


def suffix(rng: random.Random, serial: int) -> str:
    """An electronics-industry style suffix: class.model.date.serial."""
    cls = rng.choice(CLASSES)
    model = f"{cls[0]}{rng.randrange(100, 999)}"
    date = f"20{rng.randrange(18, 27):02d}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
    return f"{cls}.{model}.{date}.{serial:08d}"


def registrations(prefix: str, count: int, seed: int = 1) -> Iterator[tuple[str, list[Value]]]:
    """``count`` identifiers under ``prefix`` with 2-5 values each."""
    rng = random.Random(f"{seed}:{prefix}")
    for serial in range(count):
        sfx = suffix(rng, serial)
        values = [Value(1, "URL", f"https://id.example.com/{prefix}/{sfx}".encode())]
        extra = [
            ("PRODUCT_MODEL", sfx.split(".")[1]),
            ("MANUFACTURE_DATE", sfx.split(".")[2]),
            ("BATCH", f"B{rng.randrange(10**6):06d}"),
            ("EMAIL", f"quality@{prefix.replace('.', '-')}.example.com"),
        ]
        for index, (type_, data) in enumerate(extra[: rng.randrange(1, 5)], start=2):
            values.append(Value(index, type_, data.encode()))
        yield f"{prefix}/{sfx}", values
