import math

import numpy as np
import pytest

from batchlab.defaults import DEFAULT_FRACTION
from batchlab.spec import BatchSpec, parse_amp, parse_batch, parse_fraction
from batchlab.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (64, BatchSpec("fixed", size=64)),
        (1, BatchSpec("fixed", size=1)),
        ("64", BatchSpec("fixed", size=64)),
        (np.int64(32), BatchSpec("fixed", size=32)),
        (-1, BatchSpec("fit", fraction=DEFAULT_FRACTION)),
        ("-1", BatchSpec("fit", fraction=DEFAULT_FRACTION)),
        ("auto", BatchSpec("fit", fraction=DEFAULT_FRACTION)),
        (" AUTO ", BatchSpec("fit", fraction=DEFAULT_FRACTION)),
        (0.7, BatchSpec("fit", fraction=0.7)),
        ("0.7", BatchSpec("fit", fraction=0.7)),
        (1e-3, BatchSpec("fit", fraction=1e-3)),
    ],
)
def test_parse_batch_accepts(value, expected):
    assert parse_batch(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        0,
        -2,
        1.0,
        1.5,
        64.0,
        0.0,
        -0.5,
        "abc",
        "",
        "1.0",
        "0",
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        None,
        [64],
        "64 "[:0],
    ],
)
def test_parse_batch_rejects_with_the_value_and_the_accepted_forms(value):
    with pytest.raises(
        ValueError, match=r"invalid batch .*expected a positive int .* -1 or \"auto\" .*between 0 and 1"
    ):
        parse_batch(value)


def test_default_fraction_is_090():
    assert DEFAULT_FRACTION == 0.90


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4GiB", 4 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512 mib", 512 * 2**20),
        ("2.5GB", 2_500_000_000),
        ("1e9", 1_000_000_000),
        (4096, 4096),
        (1.5e3, 1500),
        ("100", 100),
        ("1KiB", 1024),
        ("3TB", 3 * 10**12),
    ],
)
def test_parse_bytes_accepts(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize(
    "value", ["4 potatoes", "", "GiB", "-1GiB", "0", 0, -5, math.nan, math.inf, True, None, "1.5.2GB", [1]]
)
def test_parse_bytes_rejects(value):
    with pytest.raises(ValueError, match=r"invalid byte size .*expected a positive number of bytes"):
        parse_bytes(value)


def test_format_bytes():
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(None) == "n/a"
    assert format_bytes(-2 * 2**20) == "-2.00 MiB"


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "x", None, True, math.nan])
def test_parse_fraction_rejects(value):
    with pytest.raises(ValueError, match="invalid memory fraction"):
        parse_fraction(value)


def test_parse_amp():
    assert parse_amp(None) is None
    assert parse_amp("fp32") is None
    assert parse_amp("BF16") == "bf16"
    assert parse_amp("float16") == "fp16"
    with pytest.raises(ValueError, match="invalid amp 'int8'"):
        parse_amp("int8")
