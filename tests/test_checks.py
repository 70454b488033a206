"""The argument checks and the optional-import guard every module shares."""

from __future__ import annotations

import math

import pytest

from batchlab import checks
from batchlab.optional import require


@pytest.mark.parametrize("bad", [0, -1, 1.0, "2", True, None, math.nan])
def test_integer_refuses_what_is_not_an_int_at_least_the_minimum(bad):
    with pytest.raises(ValueError, match=r"^invalid batch_size .*: expected an int >= 1$"):
        checks.integer("batch_size", bad)


def test_integer_accepts_ints_and_none_when_asked():
    assert checks.integer("n", 3) == 3 and checks.integer("n", 0, minimum=0) == 0
    assert checks.integer("cap", None, none=True) is None
    with pytest.raises(ValueError, match=r"invalid cap 0: expected an int >= 1 or None"):
        checks.integer("cap", 0, none=True)


@pytest.mark.parametrize("bad", [0, -2.5, math.nan, math.inf, True, "1"])
def test_number_refuses_non_positive_nan_inf_bools_and_strings(bad):
    with pytest.raises(ValueError, match=r"^invalid lr .*: expected a number > 0 \(a learning rate\)$"):
        checks.number("lr", bad, what="a learning rate")


def test_number_bounds_inclusive_and_inf():
    assert checks.number("x", 0, inclusive=True) == 0.0
    assert checks.number("noise", math.inf, inclusive=True, allow_inf=True) == math.inf
    with pytest.raises(ValueError, match=r"invalid noise -1: expected a number >= 0 or inf"):
        checks.number("noise", -1, inclusive=True, allow_inf=True)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.5"])
def test_fraction_is_strictly_between_zero_and_one(bad):
    with pytest.raises(ValueError, match=r"expected a number strictly between 0 and 1$"):
        checks.fraction("fraction", bad)
    assert checks.fraction("f", 1, include_one=True) == 1.0


def test_flag_and_choice():
    assert checks.flag("resume", False) is False
    with pytest.raises(ValueError, match=r"invalid resume 1: expected True or False"):
        checks.flag("resume", 1)
    assert checks.choice("mode", "eval", ("train", "eval")) == "eval"
    with pytest.raises(ValueError, match=r"invalid mode 'test': expected one of 'train', 'eval'"):
        checks.choice("mode", "test", ("train", "eval"))


def test_require_names_the_extra_that_installs_a_missing_module():
    assert require("json", extra="plot", purpose="plots").dumps([]) == "[]"
    with pytest.raises(ImportError, match=r"^plots need no_such_module: pip install 'batchlab\[plot\]'$"):
        require("no_such_module.sub", extra="plot", purpose="plots")
