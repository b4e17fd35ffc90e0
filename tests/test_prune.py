import pytest
import torch

from cfsp.arch import adapter_for
from cfsp.config import PruneConfig
from cfsp.engine.allocate import achieved_fraction, cfsp_keep_ratios, counts_from_ratios
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.engine.importance import fine_scores, relative_importance, relative_importance_sums
from cfsp.engine.plan import Geometry
from cfsp.engine.registry import CRITERIA
from cfsp.errors import UsageError
from tests.conftest import random_windows, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("method", ["cfsp", "flap", "wanda_sp"])
def test_budget_zero_is_identity(tiny, method):
    windows = random_windows()
    ref = _logits(tiny, windows.ids)
    stats = capture(tiny, windows, progress=False)
    report = prune_model(tiny, stats, PruneConfig(budget=0.0, method=method, reconstruct="none"))
    assert report.achieved_fraction == 0.0
    torch.testing.assert_close(_logits(tiny, windows.ids), ref, atol=1e-5, rtol=0)


def _mask_like(dense, report, head_dim):
    """Zero, in the dense model, exactly the heads and channels the plan removed."""
    adapter = adapter_for(dense)
    for block, plan in zip(adapter.layers(dense), report.plans, strict=True):
        p = adapter.parts(block)
        heads = p.q.out_features // head_dim
        with torch.no_grad():
            for h in set(range(heads)) - set(plan.heads):
                p.o.weight[:, h * head_dim : (h + 1) * head_dim] = 0
            for c in set(range(p.down.in_features)) - set(plan.channels):
                p.down.weight[:, c] = 0


@pytest.mark.parametrize("criterion", CRITERIA)
def test_physical_pruning_equals_masking(tiny, criterion):
    windows = random_windows()
    masked = tiny_model(_name_of(tiny))
    stats = capture(tiny, windows, progress=False)
    cfg = PruneConfig(budget=0.4, criterion=criterion, reconstruct="none", structures="ffn+heads")
    report = prune_model(tiny, stats, cfg)
    _mask_like(masked, report, head_dim=8)
    torch.testing.assert_close(
        _logits(tiny, windows.ids), _logits(masked, windows.ids), atol=1e-4, rtol=1e-4
    )
    assert abs(report.achieved_fraction - 0.4) < 0.1  # tiny blocks: coarse steps


def _name_of(model):
    from tests.conftest import TINY

    for name, (family, heads) in TINY.items():
        if family == model.config.model_type and all(
            getattr(model.config, k) == v for k, v in heads.items()
        ):
            return name
    raise AssertionError("unknown tiny model")


def test_gqa_groups_stay_consistent():
    model = tiny_model("llama-gqa")  # 6 heads, 2 KV groups of 3
    stats = capture(model, random_windows(), progress=False)
    report = prune_model(
        model, stats, PruneConfig(budget=0.5, reconstruct="none", structures="ffn+heads")
    )
    for plan in report.plans:
        per_group = {}
        for h in plan.heads:
            per_group.setdefault(h // 3, []).append(h)
        assert sorted(per_group) == plan.kv_heads  # every kept head's group is kept
        assert len({len(v) for v in per_group.values()}) == 1  # equal heads per group
        assert plan.heads == sorted(plan.heads)


def test_exponent_auto_resolves_by_budget_and_an_explicit_one_is_kept():
    # The saved config records the number used, never "auto".
    assert [PruneConfig(budget=b).exponent for b in (0.1, 0.2, 0.3, 0.5)] == [0.25, 0.25, 0.5, 0.5]
    assert PruneConfig(budget=0.1, exponent=1.0).exponent == 1.0
    assert PruneConfig(budget=0.5, exponent="auto").model_dump()["exponent"] == 0.5
    with pytest.raises(ValueError, match="expected 'auto' or a finite number >= 0"):
        PruneConfig(exponent="inf")


def test_cfsp_criterion_does_not_collapse_to_activation_norm():
    model = tiny_model("llama-gqa")
    stats = capture(model, random_windows(), progress=False)
    adapter = adapter_for(model)
    parts = adapter.parts(adapter.layers(model)[0])
    _, cfsp = fine_scores("cfsp", parts, stats.blocks[0], 8, exponent=1.0)
    _, act = fine_scores("act_norm", parts, stats.blocks[0], 8)
    ratio = cfsp / act
    assert ratio.std() / ratio.mean() > 0.01  # not a constant multiple
    assert not torch.equal(cfsp.argsort(), act.argsort())


@pytest.mark.parametrize("dim", [0, 1])
def test_relative_importance_sums_match_the_definition(dim):
    weight = torch.randn(24, 40, dtype=torch.float64)
    weight[3] = 0  # an all-zero row (and below a column): the clamped sums, as defined
    weight[:, 7] = 0
    expected = relative_importance(weight).sum(dim)
    assert torch.allclose(relative_importance_sums(weight, dim), expected, rtol=1e-5, atol=1e-6)


def test_budget_is_hit_on_a_realistic_geometry():
    geo = Geometry(
        hidden=576, head_dim=64, num_heads=9, num_kv_heads=3, intermediate=1536, num_blocks=30
    )
    angular = torch.linspace(0.05, 0.3, 30)
    for p in (0.1, 0.2, 0.3, 0.5):
        for prune_heads in (True, False):
            keep = cfsp_keep_ratios(angular, p)
            assert abs(float(keep.mean()) - (1 - p)) < 1e-9
            counts = counts_from_ratios(geo, keep, prune_heads)
            assert abs(achieved_fraction(geo, counts) - p) < 0.01
            assert min(c.channels for c in counts) >= 1


def test_cfsp_allocation_follows_angular_distance():
    angular = torch.tensor([0.3, 0.1, 0.05, 0.2])
    keep = cfsp_keep_ratios(angular, 0.5)
    assert keep.argsort().tolist() == angular.argsort().tolist()
    assert float(keep.max()) < 1.0 and float(keep.min()) >= 0.05


@pytest.mark.parametrize("budget", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_budgets_rejected(budget):
    from cfsp.engine.allocate import check_budget

    with pytest.raises(UsageError):
        check_budget(budget)


def test_unknown_method_rejected():
    from cfsp.config import validate

    with pytest.raises(UsageError, match="unknown method"):
        validate(PruneConfig, {"method": "nope"})
    with pytest.raises(UsageError, match="unknown key"):
        validate(PruneConfig, {"budgett": 0.3})


def test_default_structure_prunes_ffn_channels_only():
    model = tiny_model("llama-gqa")
    stats = capture(model, random_windows(), progress=False)
    report = prune_model(model, stats, PruneConfig(budget=0.4))
    assert report.config["structures"] == "ffn"
    assert all(p.heads == list(range(6)) and p.kv_heads == [0, 1] for p in report.plans)
    assert abs(report.achieved_fraction - 0.4) < 0.01


def test_method_variants_parse_including_plus_in_values():
    from cfsp.config import Params, parse_variant, prune_config

    assert parse_variant("flap+reconstruct=liar") == ("flap", {"reconstruct": "liar"})
    assert parse_variant("cfsp+structures=ffn+heads+round_to=64") == (
        "cfsp",
        {"structures": "ffn+heads", "round_to": 64},
    )
    cfg = prune_config(Params(), "wanda_sp+reconstruct=liar", 0.2)
    assert (cfg.allocation, cfg.criterion, cfg.reconstruct) == ("uniform", "wanda_sp", "liar")
    with pytest.raises(ValueError):
        parse_variant("cfsp+oops")


@pytest.mark.parametrize("allocation", ["cfsp", "uniform", "flap"])
def test_budget_that_would_empty_blocks_is_refused(allocation):
    model = tiny_model("llama-gqa")
    stats = capture(model, random_windows(), progress=False)
    with pytest.raises(UsageError):
        prune_model(
            model, stats, PruneConfig(budget=0.99, allocation=allocation, structures="ffn+heads")
        )
