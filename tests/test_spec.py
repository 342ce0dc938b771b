"""LoraSpec's validation of numbers that would otherwise give NaN or inf models."""

import math

import pytest

from lorax_fn import LoraError, LoraSpec


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("field", ["alpha", "alpha_pattern"])
def test_non_finite_alpha_is_refused(field, value):
    # alpha = inf makes scale·A·B = inf·0 = NaN at init: refused like NaN, not accepted.
    kwargs = {"alpha": value} if field == "alpha" else {"alpha_pattern": {"w": value}}
    with pytest.raises(LoraError, match=rf"{field}.* must be (finite|> 0), got -?(inf|nan)"):
        LoraSpec("w", rank=2, **kwargs)


@pytest.mark.parametrize("value", [math.inf, math.nan, 0.0])
def test_non_finite_init_std_is_refused(value):
    with pytest.raises(LoraError, match=r"init_std must be finite and > 0"):
        LoraSpec("w", rank=2, init_std=value)


def test_finite_alpha_is_accepted():
    assert LoraSpec("w", rank=4, alpha=1e6).scale_for("w") == pytest.approx(2.5e5)
