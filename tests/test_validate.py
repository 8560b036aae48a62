"""seedslot.validate: the one-line messages every module's argument checks share."""

import math

import pytest

from seedslot.validate import check_choice, check_float, check_int


def test_accepted_values_come_back():
    assert check_choice("mode", "dense", ("seeded", "dense")) == "dense"
    assert check_int("k", 3, 1) == 3 and check_int("limit_train", None, 2, optional=True) is None
    assert check_float("lr", 1, 0.0, lo_open=True) == 1.0 and type(check_float("lr", 1, 0.0)) is float


@pytest.mark.parametrize("call, message", [
    (lambda: check_choice("mode", "sparse", ("seeded", "dense")), "mode must be one of 'seeded', 'dense'; got 'sparse'"),
    (lambda: check_int("k", 0, 1), "k must be an int >= 1; got 0"),
    (lambda: check_int("k", True, 1), "k must be an int >= 1; got True"),
    (lambda: check_int("k", None, 1), "k must be an int >= 1; got None"),
    (lambda: check_int("limit_train", 1, 2, optional=True), "limit_train must be an int >= 2 or None; got 1"),
    (lambda: check_float("momentum", 1.0, 0.0, 1.0), "momentum must be a finite number in [0.0, 1.0); got 1.0"),
    (lambda: check_float("lr", 0.0, 0.0, lo_open=True), "lr must be a finite number in (0.0, inf); got 0.0"),
    (lambda: check_float("lr", math.nan, 0.0), "lr must be a finite number in [0.0, inf); got nan"),
    (lambda: check_float("x", 2, 0, 1, hi_open=False), "x must be a finite number in [0, 1]; got 2"),
])
def test_rejections_say_what_and_why_on_one_line(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value) == message
