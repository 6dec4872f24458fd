from typing import Any, Literal

SOCKET_BUFFER_BYTES: int
HISTOGRAM_BUCKETS: int

def run_udp(
    host: str,
    port: int,
    requests: list[bytes],
    duration: float,
    window: int = 64,
    timeout: float = 1.0,
    *,
    limit: int = 0,
    protocol: Literal["handle", "dns"] = "handle",
) -> dict[str, Any]: ...
def run_tcp(
    host: str, port: int, requests: list[bytes], duration: float, connections: int = 16, timeout: float = 1.0
) -> dict[str, Any]: ...
def bucket_bounds(index: int) -> tuple[int, int]: ...
def bucket_midpoint_ns(index: int) -> float: ...
def merge(results: list[dict[str, Any]]) -> dict[str, Any]: ...
def latency_ms(result: dict[str, Any]) -> dict[str, float]: ...
