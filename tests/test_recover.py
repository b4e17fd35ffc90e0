import copy
import random

import pytest
import torch

from cfsp.config import PruneConfig, validate
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.errors import UsageError
from cfsp.export import load_pruned, save_checkpoint
from cfsp.recover import (
    DEFAULT_TARGETS,
    BlockTargets,
    RecoverConfig,
    block_targets,
    ig_ranks,
    lora_config,
    merge,
    plan_ranks,
    recover,
    train_lora,
    uniform_ranks,
)
from tests.conftest import random_windows, tiny_model

FAST = dict(rank=4, steps=5, seqlen=16, batch=2, lr=1e-2)


@pytest.fixture(scope="module")
def pruned():
    """A per-block pruned tiny LLaMA with LIAR biases on o_proj / down_proj, and its windows."""
    model = tiny_model("llama-gqa")
    windows = random_windows()
    cfg = PruneConfig(budget=0.4, method="cfsp", temperature=0.2, structures="ffn+heads")
    prune_model(model, capture(model, windows, progress=False), cfg)
    assert len({tuple(w.values()) for w in model.config.cfsp_layer_widths}) > 1
    assert model.model.layers[0].mlp.down_proj.bias is not None
    return model, windows


def _fresh(pruned):
    model, windows = pruned
    return copy.deepcopy(model), windows.ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _mean_loss(model, ids):
    with torch.no_grad():
        return float(model(ids, labels=ids, use_cache=False).loss)


# -- ranks ----------------------------------------------------------------------------------------


def test_ig_ranks_follow_importance_and_sum_exactly():
    ranks = ig_ranks([0.1, 1.0, 3.0, 1.0], 8, [64] * 4)
    assert ranks[0] < ranks[1] < ranks[2] and ranks[1] == ranks[3]
    assert sum(ranks) == 4 * 8
    assert ig_ranks([1.0, 1.0, 1.0], 5, [8] * 3) == [5, 5, 5] == uniform_ranks(3, 5, [8] * 3)


def test_ig_ranks_floor_and_caps():
    ranks = ig_ranks([1e-6, 1.0, 10.0], 4, [4, 16, 6])
    assert ranks[0] == 1 and ranks[2] == 6 and sum(ranks) == 12
    assert all(1 <= r <= c for r, c in zip(ranks, [4, 16, 6], strict=True))


def test_ig_ranks_properties_random():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        rbar = rng.randint(1, 16)
        caps = [rng.randint(rbar, 40) for _ in range(n)]
        scores = [rng.uniform(0.01, 5.0) for _ in range(n)]
        ranks = ig_ranks(scores, rbar, caps)
        assert sum(ranks) == n * rbar
        assert all(1 <= r <= c for r, c in zip(ranks, caps, strict=True))
        costs = [rng.randint(50, 400) for _ in range(n)]
        ranks = ig_ranks(scores, rbar, caps, costs)
        assert all(1 <= r <= c for r, c in zip(ranks, caps, strict=True))
        ig = sum(r * c for r, c in zip(ranks, costs, strict=True))
        assert abs(ig - rbar * sum(costs)) <= max(costs) / 2


def test_rank_errors():
    with pytest.raises(UsageError, match="block 1 allows"):
        uniform_ranks(2, 8, [8, 4])
    with pytest.raises(UsageError, match="at least 1"):
        ig_ranks([1.0, 2.0], 0, [8, 8])
    with pytest.raises(UsageError, match="importance"):
        ig_ranks([0.0, 0.0], 2, [8, 8])


def test_rank_pattern_keys_are_exact():
    from peft.utils.other import get_pattern_key

    names = [f"model.layers.{i}.mlp.down_proj" for i in range(12)]
    blocks = [BlockTargets([n], [(96, 48)]) for n in names]  # 12 blocks: 1 must not match 11
    lc = lora_config(blocks, list(range(1, 13)), RecoverConfig(rank=4))
    keys = list(lc.rank_pattern)
    for i, name in enumerate(names):
        assert lc.rank_pattern[get_pattern_key(keys, name)] == i + 1
        assert lc.alpha_pattern[get_pattern_key(keys, name)] == pytest.approx(16 * (i + 1) / 4)
    assert get_pattern_key(keys, "model.layers.1.mlp.down_projX") not in lc.rank_pattern


def test_ig_and_uniform_trainable_params_on_pruned_model(pruned):
    model, windows = pruned
    blocks = block_targets(model, DEFAULT_TARGETS)
    costs = [b.cost for b in blocks]
    assert len(set(costs)) > 1  # widths differ per block: the match is on parameters
    records = {}
    for mode in ("ig", "uniform"):
        cfg = RecoverConfig(mode=mode, **dict(FAST, steps=1))
        peft_model, records[mode] = train_lora(
            copy.deepcopy(model), windows.ids, [0.3, 1.0], cfg, progress=False
        )
        ranks = records[mode]["ranks"]
        assert records[mode]["trainable_params"] == sum(
            r * c for r, c in zip(ranks, costs, strict=True)
        )
        for block, r in zip(blocks, ranks, strict=True):  # rank_pattern reached every module
            for name in block.names:
                assert peft_model.base_model.model.get_submodule(name).r["default"] == r
    assert records["ig"]["ranks"][0] < records["ig"]["ranks"][1]
    assert records["uniform"]["ranks"] == [4, 4]
    gap = abs(records["ig"]["trainable_params"] - records["uniform"]["trainable_params"])
    assert gap <= max(costs) / 2


# -- training and merging -------------------------------------------------------------------------


def test_merge_matches_unmerged_and_roundtrips(pruned, tmp_path, tiny_tokenizer):
    model, ids = _fresh(pruned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model, _ = train_lora(model, ids, [1.0, 0.5], RecoverConfig(**FAST), progress=False)
    unmerged = _logits(peft_model, ids)
    merged = merge(peft_model)
    after = merged.state_dict()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    torch.testing.assert_close(_logits(merged, ids), unmerged, atol=1e-5, rtol=1e-5)
    down = "model.layers.1.mlp.down_proj"
    assert not torch.equal(after[f"{down}.weight"], before[f"{down}.weight"])
    torch.testing.assert_close(after[f"{down}.bias"], before[f"{down}.bias"])  # bias kept
    assert all(p.requires_grad for p in merged.parameters())
    save_checkpoint(merged, tiny_tokenizer, tmp_path, {"test": True})
    torch.testing.assert_close(_logits(load_pruned(tmp_path), ids), _logits(merged, ids))


def test_fused_family_recovers_through_its_fused_modules(tmp_path, tiny_tokenizer):
    """Phi-3 has no q_proj or gate_proj: the default targets reach qkv_proj / gate_up_proj, and
    the merged per-block model saves and loads like any other."""
    model = tiny_model("phi3-gqa")
    windows = random_windows()
    cfg = PruneConfig(budget=0.4, method="cfsp", temperature=0.2, structures="ffn+heads")
    prune_model(model, capture(model, windows, progress=False), cfg)
    blocks = block_targets(model, DEFAULT_TARGETS)
    assert [n.rsplit(".", 1)[-1] for n in blocks[0].names] == [
        "o_proj",
        "qkv_proj",
        "gate_up_proj",
        "down_proj",
    ]
    merged, _ = recover(model, windows.ids, [1.0, 0.5], RecoverConfig(**FAST), progress=False)
    save_checkpoint(merged, tiny_tokenizer, tmp_path, {"test": True})
    ids = windows.ids
    torch.testing.assert_close(_logits(load_pruned(tmp_path), ids), _logits(merged, ids))


def test_recovery_lowers_loss():
    model = tiny_model("qwen2-gqa")
    ids = torch.arange(40).remainder(10).add(3).repeat(8, 1)  # repeated text
    ids = torch.stack([row.roll(-i) for i, row in enumerate(ids)])
    loss_before = _mean_loss(model, ids)
    steps = []
    cfg = RecoverConfig(mode="uniform", rank=4, steps=30, seqlen=32, batch=4, lr=5e-3)
    merged, record = recover(
        model, ids, None, cfg, progress=False, on_step=lambda s, v: steps.append(s)
    )
    assert steps == list(range(1, 31)) and len(record["losses"]) == 30
    loss_after = _mean_loss(merged, ids)
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    assert record["losses"][-1] < record["losses"][0]


def test_deterministic(pruned):
    results = []
    for _ in range(2):
        model, ids = _fresh(pruned)
        merged, record = recover(model, ids, [1.0, 2.0], RecoverConfig(**FAST), progress=False)
        results.append((merged.state_dict(), record["losses"]))
    (a, la), (b, lb) = results
    assert la == lb
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- errors ---------------------------------------------------------------------------------------


def test_errors(pruned):
    model, windows = pruned
    ids = windows.ids
    cfg = RecoverConfig(**FAST)
    with pytest.raises(UsageError, match="more text"):
        recover(model, ids[:0], [1.0, 1.0], cfg, progress=False)
    with pytest.raises(UsageError, match="recover.batch=2"):
        recover(model, ids[:1], [1.0, 1.0], cfg, progress=False)
    with pytest.raises(UsageError, match="at least 2"):
        recover(model, ids[:, :1], [1.0, 1.0], cfg, progress=False)
    blocks = block_targets(model, DEFAULT_TARGETS)
    shapes = [(n, min(shape)) for b in blocks for n, shape in zip(b.names, b.shapes, strict=True)]
    cap = min(c for _, c in shapes)
    name = next(n for n, c in shapes if c == cap)  # the first module that refuses cap + 1
    big = RecoverConfig(**dict(FAST, rank=cap + 1))
    with pytest.raises(UsageError, match=rf"{name} allows \(at most {cap}"):
        recover(model, ids, [1.0, 1.0], big, progress=False)
    bad = RecoverConfig(**dict(FAST, targets=["q_proj", "qkv_proj"]))
    with pytest.raises(UsageError, match="qkv_proj"):
        recover(model, ids, [1.0, 1.0], bad, progress=False)
    with pytest.raises(UsageError, match="2 block importance scores"):
        plan_ranks(blocks, [1.0], cfg)
    for key in ("rank", "steps"):
        with pytest.raises(UsageError, match=key):
            validate(RecoverConfig, {key: 0})
    assert not hasattr(model, "peft_config")  # nothing was wrapped on the way to an error
