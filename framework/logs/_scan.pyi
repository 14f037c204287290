from collections.abc import Sequence

Rows = list[tuple[object, ...]]

def scan(
    fd: int,
    ranges: Sequence[tuple[int, int]],
    max_line: int,
    since: bytes | None,
    until: bytes | None,
    rare: Sequence[bytes],
    timed: Sequence[bytes],
    min_ms: float,
    inv_log_gamma: float,
    zero_bucket: int,
) -> tuple[Rows, Rows, Rows, bytes, int] | None: ...
