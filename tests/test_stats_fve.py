"""FVE from per-item cosines, its bootstrap interval and the paired FVE difference (pure maths)."""

from __future__ import annotations

import pytest
import torch

from cycle_oracle.encoder import cosine, fve
from cycle_oracle.stats import fve_from_cosines, fve_interval, paired_fve_difference


def vectors(seed: int, n: int = 40, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g) * 3
    v = mean + torch.randn(n, d, generator=g)
    return v, mean, g


def test_fve_from_cosines_is_the_encoders_fve():
    v, mean, g = vectors(0)
    for noise in (0.1, 1.0, 3.0):
        v_hat = v + noise * torch.randn(v.shape, generator=g)
        got = fve_from_cosines(cosine(v_hat, v), cosine(mean[None].expand_as(v), v))
        assert got == pytest.approx(fve(v_hat, v, mean), abs=1e-5)


def test_fve_interval_holds_the_estimate_and_narrows_with_items():
    v, mean, g = vectors(1, n=400)
    v_hat = v + 0.7 * torch.randn(v.shape, generator=g)
    c_hat, c_mean = cosine(v_hat, v), cosine(mean[None].expand_as(v), v)
    wide = fve_interval(c_hat[:40], c_mean[:40])
    narrow = fve_interval(c_hat, c_mean)
    for r in (wide, narrow):
        assert r["ci_low"] <= r["fve"] <= r["ci_high"]
    assert narrow["ci_high"] - narrow["ci_low"] < wide["ci_high"] - wide["ci_low"]


def test_paired_fve_difference_sign_and_zero():
    v, mean, g = vectors(2, n=200)
    good = v + 0.3 * torch.randn(v.shape, generator=g)
    bad = v + 2.0 * torch.randn(v.shape, generator=g)
    c_mean = cosine(mean[None].expand_as(v), v)
    d = paired_fve_difference(cosine(good, v), cosine(bad, v), c_mean)
    assert d["mean"] == pytest.approx(fve(good, v, mean) - fve(bad, v, mean), abs=1e-5)
    assert 0 < d["ci_low"] <= d["mean"] <= d["ci_high"]
    same = paired_fve_difference(cosine(good, v), cosine(good, v), c_mean)
    assert same["mean"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    with pytest.raises(ValueError, match="equal-length"):
        paired_fve_difference(cosine(good, v)[:5], cosine(bad, v), c_mean)
