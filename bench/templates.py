"""Two realistic templates (the tests' and the benches'): an automotive part (industry C 36 367 3670,
motor-vehicle parts and accessories manufacturing) of the secondary node 88.100, and a food
traceability record (C 14 143 1431, ...) of the secondary node 88.100 too."""

from __future__ import annotations

from resolver.identifier import parse_prefix
from resolver.template import Industry, Item, Template

AUTOMOTIVE_PART = Template(
    parse_prefix("88.100"),
    "auto-part",
    2,
    Industry("C", "36", "367", "3670"),
    (
        Item("partNumber", "string", required=True, min_length=4, max_length=32),
        Item("partName", "string", required=True, max_length=64),
        Item("material", "enum", values=("steel", "aluminium", "plastic", "rubber", "composite")),
        Item("weightKg", "number", minimum=0, maximum=5000),
        Item("batchSize", "integer", minimum=1),
        Item("productionDate", "date", required=True, format="YYYY-MM-DD"),
        Item("manufacturer", "string", required=True, max_length=128),
        Item("datasheet", "url"),
    ),
    "A vehicle part as its maker registers it",
)

FOOD_TRACE = Template(
    parse_prefix("88.100"),
    "food-trace",
    1,
    Industry("C", "14", "143", "1431"),
    (
        Item("productName", "string", required=True, max_length=64),
        Item("lot", "string", required=True, min_length=1, max_length=20),
        Item("origin", "string", required=True),
        Item("producedAt", "datetime", required=True, format="YYYY-MM-DD HH:mm:ss"),
        Item("shelfLifeDays", "integer", required=True, minimum=1, maximum=3650),
        Item("storage", "enum", values=("ambient", "chilled", "frozen")),
        Item("inspector", "email"),
    ),
)
