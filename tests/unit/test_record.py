from __future__ import annotations

import pytest

from resolver.errors import InvalidValue, LimitExceeded
from resolver.identifier import parse_identifier
from resolver.record import DEFAULT_PERMISSIONS, Limits, Permission, Record, TtlType, Value, check_values


def v(index: int, type_: str = "URL", data: bytes = b"x", **kw: object) -> Value:
    return Value(index, type_, data, **kw)  # type: ignore[arg-type]


def test_values_are_sorted_by_index() -> None:
    assert [x.index for x in check_values([v(3), v(1), v(2)], Limits())] == [1, 2, 3]


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        ([v(1), v(1)], InvalidValue, "index 1 appears more than once"),
        ([v(0)], InvalidValue, "index 0 is out of range"),
        ([v(1, "")], InvalidValue, "value 1 has an empty type"),
        ([v(1, "T" * 129)], InvalidValue, "type is 129 bytes"),
        ([v(1, "A\nB")], InvalidValue, "control character"),
        ([v(1, data=b"x" * 65537)], InvalidValue, "data is 65537 bytes long; the limit is 65536"),
        ([v(i) for i in range(1, 2050)], LimitExceeded, "2049 values"),
    ],
)
def test_bad_values_are_rejected(values: list[Value], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        check_values(values, Limits())


def test_record_limit_counts_all_values() -> None:
    with pytest.raises(LimitExceeded, match="record is about"):
        check_values([v(i, data=b"x" * 60000) for i in range(1, 6)], Limits())


def test_cache_ttl_is_the_smallest_value_ttl() -> None:
    record = Record(parse_identifier("88.1/x"), (v(1, ttl=300), v(2, ttl=60)), 1)
    assert record.cache_ttl(now=0) == 60
    absolute = Record(parse_identifier("88.1/x"), (v(1, ttl=1000, ttl_type=TtlType.ABSOLUTE),), 1)
    assert absolute.cache_ttl(now=900) == 100


def test_same_content_ignores_timestamps_and_order() -> None:
    ident = parse_identifier("88.1/x")
    a = Record(ident, (v(1, timestamp=5), v(2)), 1)
    b = Record(ident, (v(2, timestamp=9), v(1)), 7)
    assert a.same_content(b)
    assert not a.same_content(Record(ident, (v(1), v(2, data=b"other")), 1))


def test_public_view_hides_values_without_public_read() -> None:
    secret = v(2, permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)
    record = Record(parse_identifier("88.1/x"), (v(1), secret), 1)
    assert [x.index for x in record.public_view().values] == [1]
    assert v(1).permissions == DEFAULT_PERMISSIONS


def test_batch_limit() -> None:
    Limits().check_batch(2000)
    with pytest.raises(LimitExceeded, match="batch of 2001 items; the limit is 2000"):
        Limits().check_batch(2001)
