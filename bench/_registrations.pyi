def registration_wire_columns(
    prefix: str,
    key_prefix: str,
    count: int,
    seed: int,
    start: int,
    stop: int,
    timestamp: int,
    ttl: int,
    permissions: int,
) -> tuple[list[str], list[bytes]]: ...
