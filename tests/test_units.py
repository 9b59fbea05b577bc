from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtlsproxy.address import Address, parse_address
from mtlsproxy.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800), ("250ms", 0.25),
     ("1d12h", 129600), (" 2H ", 7200), ("1.5s", 1.5), ("1w", 604800)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "5", "s", "5 s", "-5s", "5y", "five seconds", "5s5", "1e3s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**8))
def test_format_duration_roundtrips_whole_units(seconds: int) -> None:
    text = format_duration(timedelta(seconds=seconds))
    # The short form keeps the two largest units: it is exact up to what it drops.
    parsed = parse_duration(text).total_seconds()
    assert 0 <= seconds - parsed < 3600


def test_format_duration_signs() -> None:
    assert format_duration(timedelta(hours=-2)) == "-2h"
    assert format_duration(timedelta(0)) == "0s"
    assert format_duration(timedelta(hours=23, minutes=59, seconds=58)) == "23h59m"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16KiB", 16384),
        ("1GiB", 2**30),
        ("500kb", 500_000),
        ("1024", 1024),
        (0, 0),
        ("10 MiB", 10 * 2**20),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5KiB", "KiB", "-1", "1TiB", -4])
def test_parse_size_refuses(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:8443", Address("127.0.0.1", 8443)), ("[::1]:8443", Address("::1", 8443)),
     ("0.0.0.0:1", Address("0.0.0.0", 1)), ("localhost:65535", Address("localhost", 65535))],
)  # fmt: skip
def test_parse_address(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    "text", ["8443", ":8443", "127.0.0.1", "127.0.0.1:65536", "::1:8443", "[::1]8443",
             "[nothost]:1", "host:port"],
)  # fmt: skip
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_loopback() -> None:
    assert parse_address("127.0.0.2:1").is_loopback
    assert parse_address("[::1]:1").is_loopback
    assert parse_address("localhost:1").is_loopback
    assert not parse_address("0.0.0.0:1").is_loopback
