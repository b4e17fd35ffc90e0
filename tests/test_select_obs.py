"""Error-aware selection (cfsp.engine.select_obs, criterion `obs`): the greedy removal minimises
the error the LIAR refit leaves, keeps GQA groups whole, and both engines keep the same set."""

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from cfsp.config import PruneConfig
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.engine.plan import BlockCounts, BlockPlan
from cfsp.engine.reconstruct import fold
from cfsp.engine.registry import CRITERIA
from cfsp.engine.select_obs import select_block, select_channels, select_heads
from cfsp.engine.statistics import ChannelStats
from cfsp.engine.streamed import prune_streamed
from cfsp.export import load_pruned
from tests.conftest import random_windows, tiny_model

DAMPING = 0.01


@pytest.fixture(autouse=True)
def _float64_math(monkeypatch):
    """These tests check the formulas to 1e-6 or so: float64 math (cfsp's default is float32,
    whose agreement with float64 on real models is tests/test_devices.py's concern)."""
    monkeypatch.setenv("CFSP_MATH_DTYPE", "float64")


def _stats(x: torch.Tensor) -> ChannelStats:
    st = ChannelStats.empty(x.shape[1])
    st.add(x, torch.float64)
    return st


def _correlated(n: int, d: int, seed: int, tokens: int = 600):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix + 0.3
    return torch.randn(d, n, generator=gen, dtype=torch.float64), _stats(x)


def _uncorrelated(n: int, d: int, seed: int) -> tuple[torch.Tensor, ChannelStats]:
    """Statistics with an exactly diagonal covariance: removal errors add up channel by channel."""
    gen = torch.Generator().manual_seed(seed)
    var = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    w = torch.randn(d, n, generator=gen, dtype=torch.float64)
    return w, ChannelStats(100, torch.zeros(n, dtype=torch.float64), 100 * torch.diag(var))


def schur_error(w: torch.Tensor, stats: ChannelStats, keep, damping: float = DAMPING) -> float:
    """tr(W_P (C/C_SS) W_P^T) with C damped as the selection damps it, straight from the formula."""
    cov = stats.cov
    c = cov + damping * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    keep = sorted(keep)
    pruned = sorted(set(range(cov.shape[0])) - set(keep))
    schur = c[pruned][:, pruned] - c[pruned][:, keep] @ torch.linalg.solve(
        c[keep][:, keep], c[keep][:, pruned]
    )
    return float(torch.trace(w[:, pruned] @ schur @ w[:, pruned].T))


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_tracked_error_is_the_schur_complement_error(chunk):
    w, st = _correlated(24, 5, seed=1)
    keep, error = select_channels(w, st, 10, DAMPING, chunk=chunk)
    assert len(keep) == 10 and keep == sorted(keep)
    assert error == pytest.approx(schur_error(w, st, keep), rel=1e-8)


def test_error_is_what_the_liar_refit_leaves():
    """The objective the selection minimises is the output error after LIAR's fold (small
    damping: the two dampings agree in the limit)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(800, 16, generator=gen, dtype=torch.float64) @ torch.randn(
        16, 16, generator=gen, dtype=torch.float64
    )
    w = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    b = torch.zeros(4, dtype=torch.float64)
    st = _stats(x)
    keep, error = select_channels(w, st, 9, 1e-9, chunk=1)
    w2, b2 = fold(w, b, st, torch.tensor(keep), "liar", damping=1e-9)
    residual = x @ w.T + b - (x[:, keep] @ w2.T + b2)
    assert error == pytest.approx(float(residual.square().sum(1).mean()), rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_is_exact_when_errors_add_up(seed):
    """Uncorrelated inputs: removal costs add up, so the greedy equals brute force (n=6, k=3)."""
    w, st = _uncorrelated(6, 4, seed)
    keep, error = select_channels(w, st, 3, DAMPING, chunk=1)
    best = min(itertools.combinations(range(6), 3), key=lambda k: schur_error(w, st, k))
    assert keep == list(best)
    assert error == pytest.approx(schur_error(w, st, best), rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_greedy_leaves_less_error_than_top_scores(seed):
    """Correlated inputs (n=48, keep 24): the refit leaves less error on the greedy set than on
    the top-24 set of every score-based criterion."""
    w, st = _correlated(48, 12, seed)
    keep, error = select_channels(w, st, 24, DAMPING)
    gen = torch.Generator().manual_seed(0)
    for name in ("cfsp", "act_norm", "wanda_sp", "flap", "magnitude", "random"):
        scores = CRITERIA[name](w, [], st, 0.5, gen)
        top = scores.topk(24).indices.tolist()
        assert error <= schur_error(w, st, top), name


def test_heads_keep_whole_gqa_groups():
    """4 KV groups of 3 heads, keep 2 groups x 2 heads: a valid GQA set, error as the formula."""
    hd = 4
    w, st = _correlated(12 * hd, 6, seed=3)
    heads, groups, error = select_heads(w, st, BlockCounts(2, 2, 0), 4, hd, DAMPING)
    assert len(groups) == 2 and groups == sorted(groups)
    assert heads == sorted(heads) and len(heads) == 4
    assert sorted({h // 3 for h in heads}) == groups
    assert all(sum(h // 3 == g for h in heads) == 2 for g in groups)
    channels = [h * hd + i for h in heads for i in range(hd)]
    assert error == pytest.approx(schur_error(w, st, channels), rel=1e-8)


def test_heads_equal_brute_force_when_errors_add_up():
    """Uncorrelated inputs: the two phases (heads within groups, then groups) are exact."""
    hd, group = 2, 3
    w, st = _uncorrelated(6 * hd, 5, seed=4)  # 6 heads in 2 groups of 3
    heads, groups, error = select_heads(w, st, BlockCounts(1, 2, 0), 2, hd, DAMPING)
    valid = [(g, pair) for g in range(2) for pair in itertools.combinations(range(3), 2)]

    def channels(g, pair):
        return [(g * group + h) * hd + i for h in pair for i in range(hd)]

    best = min(valid, key=lambda v: schur_error(w, st, channels(*v)))
    assert groups == [best[0]] and heads == [best[0] * group + h for h in best[1]]
    assert error == pytest.approx(schur_error(w, st, channels(*best)), rel=1e-9)


def test_select_block_leaves_unpruned_modules_alone():
    w_o, st_o = _correlated(8, 4, seed=5)
    w_d, st_d = _correlated(10, 4, seed=6)
    plan = BlockPlan(heads=[0, 1, 2, 3], kv_heads=[0, 1], channels=[0, 1, 2, 3])
    chosen = select_block(w_o, w_d, st_o, st_d, plan, 2, 2, DAMPING)
    assert chosen.heads == [0, 1, 2, 3] and chosen.kv_heads == [0, 1]
    assert chosen.channels == select_channels(w_d, st_d, 4, DAMPING)[0]


def test_prune_model_keeps_the_error_selected_set():
    """In the in-memory engine the report's kept sets are select_block's on the captured
    statistics, with the allocation's counts (the same as the cfsp criterion's)."""
    windows = random_windows()
    model = tiny_model("llama-gqa")
    stats = capture(model, windows, progress=False)
    parts = [model.model.layers[i].mlp.down_proj.weight.clone() for i in range(2)]
    o_parts = [model.model.layers[i].self_attn.o_proj.weight.clone() for i in range(2)]
    base = prune_model(
        tiny_model("llama-gqa"), stats, PruneConfig(budget=0.4, structures="ffn+heads")
    )
    cfg = PruneConfig(budget=0.4, structures="ffn+heads", criterion="obs")
    report = prune_model(model, stats, cfg)
    for i, plan in enumerate(report.plans):
        assert plan.widths() == base.plans[i].widths()
        want = select_block(
            o_parts[i], parts[i], stats.blocks[i].o, stats.blocks[i].down, base.plans[i], 2, 8,
            cfg.damping,
        )  # fmt: skip
        assert plan.to_dict() == want.to_dict()


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3-kv1"])
@pytest.mark.parametrize("stats_kind", ["dense", "sequential"])
def test_streamed_engine_keeps_the_same_set(tmp_path, name, stats_kind):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model(name).save_pretrained(src)
    out.mkdir()
    windows = random_windows()
    cfg = PruneConfig(budget=0.5, structures="ffn+heads", criterion="obs", stats=stats_kind)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    stats = capture(model, windows, batch_size=4, progress=False)
    report = prune_model(model, stats, cfg, windows=windows, batch_size=4)
    outcome = prune_streamed(src, windows, cfg, out, batch_size=4)
    assert [p.to_dict() for p in outcome.report.plans] == [p.to_dict() for p in report.plans]
    with torch.no_grad():
        torch.testing.assert_close(
            load_pruned(out)(windows.ids).logits, model(windows.ids).logits, atol=1e-5, rtol=1e-5
        )
