"""measure.verdict: the one ok/wrong rule of measure_cell and sharded.measure_sharded_cell."""

from __future__ import annotations

import math

from ctxbench.measurements.kernel.measure import GRAD_TOLERANCE_FACTOR, verdict


def test_error_within_tolerance_is_ok():
    assert verdict(1e-6, 1e-5, "float32", True) == ("ok", "")
    assert verdict(1e-5, 1e-5, "float32", True) == ("ok", "")  # the tolerance itself passes


def test_error_over_tolerance_is_wrong():
    assert verdict(2e-5, 1e-5, "float32", True) == (
        "wrong", "relative L2 error 2e-05 over the float32 tolerance 1e-05")


def test_nan_and_inf_errors_are_wrong():
    for err in (math.nan, math.inf):
        status, message = verdict(err, 1e-2, "bfloat16", True)
        assert status == "wrong" and message == f"relative L2 error {err:.3g} over the bfloat16 tolerance 0.01"


def test_dtype_mismatch_is_wrong():
    assert verdict(0.0, 1e-3, "float16", False) == ("wrong", "output dtype differs from the input's float16")


def test_gradient_over_twice_the_tolerance_is_wrong():
    tol = 1e-5
    assert GRAD_TOLERANCE_FACTOR == 2.0
    assert verdict(0.0, tol, "float32", True, grad_err=1.9 * tol) == ("ok", "")
    assert verdict(0.0, tol, "float32", True, grad_err=2.1 * tol) == (
        "wrong", "gradient relative L2 error 2.1e-05 over 2x the float32 tolerance")
    assert verdict(0.0, tol, "float32", True, grad_err=math.nan)[0] == "wrong"
    assert verdict(0.0, tol, "float32", True, grad_err=None) == ("ok", "")  # not checked


def test_every_reason_is_given_in_order():
    status, message = verdict(1.0, 1e-5, "float32", False, grad_err=1.0)
    assert status == "wrong"
    assert message.split("; ") == ["relative L2 error 1 over the float32 tolerance 1e-05",
                                   "output dtype differs from the input's float32",
                                   "gradient relative L2 error 1 over 2x the float32 tolerance"]
