import pytest
import torch

from cfsp.config import PruneConfig
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.engine.reconstruct import fold, relative_error
from cfsp.engine.statistics import ChannelStats
from tests.conftest import random_windows, tiny_model


@pytest.fixture(autouse=True)
def _float64_math(monkeypatch):
    """These tests check the formulas to 1e-6 or so: float64 math (cfsp's default is float32,
    whose agreement with float64 on real models is tests/test_devices.py's concern)."""
    monkeypatch.setenv("CFSP_MATH_DTYPE", "float64")


def _stats(x: torch.Tensor) -> ChannelStats:
    st = ChannelStats.empty(x.shape[1])
    st.add(x, torch.float64)
    return st


def _setup(n=12, tokens=400, seed=0, n_out=5):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix + 0.5
    w = torch.randn(n_out, n, generator=gen, dtype=torch.float64)
    b = torch.randn(n_out, generator=gen, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 10])
    return x, w, b, keep


def _error(x, w, b, keep, w2, b2):
    y, y2 = x @ w.T + b, x[:, keep] @ w2.T + b2
    return float(((y - y2) ** 2).sum() / (y**2).sum())


def test_zero_interpolation_equals_bias_compensation():
    x, w, b, keep = _setup()
    st = _stats(x)
    w_bias, b_bias = fold(w, b, st, keep, "bias")
    pruned = torch.tensor(sorted(set(range(12)) - set(keep.tolist())))
    torch.testing.assert_close(b_bias, b + w[:, pruned] @ x[:, pruned].mean(0))
    torch.testing.assert_close(w_bias, w[:, keep])
    # liar with infinite damping has Q -> 0 and so tends to bias-only
    w_inf, b_inf = fold(w, b, st, keep, "liar", damping=1e12)
    torch.testing.assert_close(w_inf, w_bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(b_inf, b_bias, atol=1e-6, rtol=0)


def test_nothing_pruned_is_identity():
    x, w, b, _ = _setup()
    keep = torch.arange(12)
    for method in ("liar", "bias", "none"):
        w2, b2 = fold(w, b, _stats(x), keep, method)
        torch.testing.assert_close(w2, w)
        torch.testing.assert_close(b2, b)


def test_error_order_liar_bias_none_and_exact_formula():
    x, w, b, keep = _setup()
    st = _stats(x)
    errs = {}
    for method in ("liar", "bias", "none"):
        w2, b2 = fold(w, b, st, keep, method, damping=1e-6)
        errs[method] = _error(x, w, b, keep, w2, b2)
        assert relative_error(w, b, st, keep, w2, b2) == pytest.approx(errs[method], rel=1e-4)
    assert errs["liar"] <= errs["bias"] <= errs["none"]


@pytest.mark.parametrize("n_out", [3, 5, 9])  # fewer outputs than the 5 pruned inputs, or not
def test_liar_equals_least_squares_refit(n_out):
    x, w, b, keep = _setup(n_out=n_out)
    w2, b2 = fold(w, b, _stats(x), keep, "liar", damping=1e-10)
    design = torch.cat([x[:, keep], torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(design, x @ w.T + b).solution  # [|S|+1, n_out]
    torch.testing.assert_close(w2, sol[:-1].T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b2, sol[-1], atol=1e-6, rtol=1e-6)


def test_exactly_linear_features_are_recovered_exactly():
    gen = torch.Generator().manual_seed(1)
    kept = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    derived = kept @ torch.randn(6, 3, generator=gen, dtype=torch.float64) + 2.0
    x = torch.cat([kept, derived], 1)
    w = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    keep = torch.arange(6)
    w2, b2 = fold(w, None, _stats(x), keep, "liar", damping=1e-12)
    torch.testing.assert_close(x[:, keep] @ w2.T + b2, x @ w.T, atol=1e-6, rtol=1e-6)


def test_dead_channels_give_no_nans():
    x, w, b, keep = _setup()
    x[:, 0] = 0.0  # a kept channel that never fires
    x[:, 1] = 0.0  # a pruned one too
    x[:, 2] = x[:, 3]  # two identical kept channels: singular C_SS
    w2, b2 = fold(w, b, _stats(x), keep, "liar", damping=1e-9)
    assert torch.isfinite(w2).all() and torch.isfinite(b2).all()
    zero = ChannelStats.empty(12)
    zero.add(torch.zeros(10, 12), torch.float64)
    w3, b3 = fold(w, b, zero, keep, "liar")
    assert torch.isfinite(w3).all() and torch.isfinite(b3).all()


def test_model_level_error_order_on_calibration_data():
    windows = random_windows(n=8, seqlen=16)
    rows = {}
    for method in ("liar", "bias", "none"):
        model = tiny_model("llama-gqa")
        stats = capture(model, windows, progress=False)
        report = prune_model(
            model, stats, PruneConfig(budget=0.4, reconstruct=method, structures="ffn+heads")
        )
        rows[method] = report.errors
    for i in range(2):
        for mod in ("o", "down"):
            key = f"{mod}_after"
            assert rows["liar"][i][key] <= rows["bias"][i][key] + 1e-9
            assert rows["bias"][i][key] <= rows["none"][i][key] + 1e-9


def test_sequential_statistics_follow_the_pruned_prefix():
    windows = random_windows(n=8, seqlen=16)
    models = {}
    reports = {}
    for mode in ("dense", "sequential"):
        model = tiny_model("llama-gqa")
        stats = capture(model, windows, progress=False)
        cfg = PruneConfig(budget=0.4, reconstruct="liar", stats=mode, structures="ffn+heads")
        reports[mode] = prune_model(model, stats, cfg, windows=windows)
        models[mode] = model
    # Same plan either way; block 0 sees identical inputs, later blocks do not.
    assert [p.to_dict() for p in reports["dense"].plans] == [
        p.to_dict() for p in reports["sequential"].plans
    ]
    assert reports["dense"].errors[0] == pytest.approx(reports["sequential"].errors[0], rel=1e-6)
    assert reports["dense"].errors[1] != pytest.approx(reports["sequential"].errors[1], rel=1e-6)
    with pytest.raises(Exception, match="calibration windows"):
        model = tiny_model("llama-gqa")
        prune_model(
            model,
            capture(model, windows, progress=False),
            PruneConfig(budget=0.4, stats="sequential"),
        )
