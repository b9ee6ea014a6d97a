"""tests/numerics.py: the comparison every float test uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numerics import assert_close_to_scale


def test_error_is_relative_to_the_tensors_scale() -> None:
    """Protects the rule: rounding of large values passes, a real difference fails with error, scale and
    place."""
    ref = np.array([[4e4, -82.8356]], dtype=np.float32)
    assert_close_to_scale(
        ref + np.float32([[0, 3.4e-3]]), ref
    )  # the AVX-512 batching difference: 1e-7 x scale
    with pytest.raises(
        AssertionError, match=r"tokens: max abs error 0\.5 at \[0, 1\] .* > 1e-05 x scale 4e\+04"
    ):
        assert_close_to_scale(ref + np.float32([[0, 0.5]]), ref, what="tokens")
    with pytest.raises(AssertionError, match="inf"):
        assert_close_to_scale(np.float32([[np.nan, 0]]), ref)
    small = torch.tensor([1e-3, 2e-3])  # below 1 the scale is 1: an absolute bound
    assert_close_to_scale(small + 5e-6, small)
    with pytest.raises(AssertionError):
        assert_close_to_scale(small + 5e-5, small)
