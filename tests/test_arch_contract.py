"""One contract suite, run against every adapter on tiny configs (and the real model once)."""

import copy

import pytest
import torch
from transformers import AutoConfig

from cfsp.arch import SUPPORTED, adapter_for
from cfsp.engine.plan import BlockPlan
from cfsp.errors import UsageError


def test_roles_match_config(tiny):
    adapter = adapter_for(tiny)
    cfg = tiny.config
    hd = adapter.head_dim(cfg)
    layers = adapter.layers(tiny)
    assert len(layers) == cfg.num_hidden_layers
    for block in layers:
        p = adapter.parts(block)
        assert p.q.weight.shape == (cfg.num_attention_heads * hd, cfg.hidden_size)
        assert p.k.weight.shape == (cfg.num_key_value_heads * hd, cfg.hidden_size)
        assert p.v.weight.shape == p.k.weight.shape
        assert p.o.weight.shape == (cfg.hidden_size, cfg.num_attention_heads * hd)
        assert p.gate.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
        assert p.up.weight.shape == p.gate.weight.shape
        assert p.down.weight.shape == (cfg.hidden_size, cfg.intermediate_size)
    widths = adapter.block_widths(tiny)
    assert {w.num_heads for w in widths} == {cfg.num_attention_heads}
    assert {w.num_kv_heads for w in widths} == {cfg.num_key_value_heads}


def test_bias_flags_match_modules(tiny):
    adapter = adapter_for(tiny)
    p = adapter.parts(adapter.layers(tiny)[0])
    assert (p.q.bias is not None) == adapter.has_bias(tiny.config, "qkv")
    assert (p.o.bias is not None) == adapter.has_bias(tiny.config, "o")
    assert (p.down.bias is not None) == adapter.has_bias(tiny.config, "mlp")


def test_roles_are_on_the_forward_path(tiny):
    """Zeroing the role modules must change the output: the adapter found the live modules."""
    adapter = adapter_for(tiny)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = tiny(ids).logits
        for block in adapter.layers(tiny):
            p = adapter.parts(block)
            p.o.weight.zero_()
            p.down.weight.zero_()
            for layer in (p.o, p.down):
                if layer.bias is not None:
                    layer.bias.zero_()
        blank = tiny(ids).logits
        # With every block's writes zeroed the blocks are identities: logits = head(norm(embed)).
        emb = adapter.embed(tiny)(ids)
        direct = tiny.lm_head(adapter.decoder(tiny).norm(emb))
    assert not torch.allclose(ref, blank)
    torch.testing.assert_close(blank, direct)


def test_unsupported_architecture_names_supported():
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2)
    with pytest.raises(UsageError) as err:
        adapter_for(config)
    assert "gpt2" in str(err.value)
    for name in SUPPORTED:
        assert name in str(err.value)



def _first_block_inputs(model, ids):
    """Inputs of block 0's o_proj and down_proj, [T, n] each, in one plain forward."""
    adapter = adapter_for(model)
    p = adapter.parts(adapter.layers(model)[0])
    seen = {}
    hooks = [
        p.o.register_forward_pre_hook(lambda m, a: seen.update(o=a[0].flatten(0, -2))),
        p.down.register_forward_pre_hook(lambda m, a: seen.update(down=a[0].flatten(0, -2))),
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def _zeroed(model, factor: float = 0.0, **rows):
    """A copy of `model` with rows (within each role, e.g. q=[0, 1]) of block 0 times `factor`."""
    model = copy.deepcopy(model)
    adapter = adapter_for(model)
    p = adapter.parts(adapter.layers(model)[0])
    with torch.no_grad():
        for role, index in rows.items():
            view = getattr(p, role)
            view.weight[index] *= factor
            if view.bias is not None:
                view.bias[index] *= factor
    return model


def test_role_rows_are_what_the_forward_uses(tiny):
    """Each role's rows, fused or not, are what that role is in the stock forward.

    With query head h's q rows zeroed its scores are 0 and it attends uniformly; zeroing the k
    rows of KV head g does the same to every query head of g (and only those); zeroing g's v
    rows zeroes the o_proj inputs of g's query heads; zeroing up (or gate: act(0) = 0) rows of
    channel c zeroes down_proj input c, and doubling up's (not gate's) rows doubles it.
    """
    adapter = adapter_for(tiny)
    cfg, hd = tiny.config, adapter.head_dim(tiny.config)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    g = cfg.num_key_value_heads - 1
    heads_of_g = range(g * group, (g + 1) * group)
    g_rows = list(range(g * hd, (g + 1) * hd))  # within k or v
    g_cols = [h * hd + j for h in heads_of_g for j in range(hd)]  # within q, o's input
    others = [j for j in range(cfg.num_attention_heads * hd) if j not in g_cols]
    h = heads_of_g[0]
    h_cols = list(range(h * hd, (h + 1) * hd))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = _first_block_inputs(tiny, ids)

    one_q = _first_block_inputs(_zeroed(tiny, q=h_cols), ids)["o"]
    changed = (one_q - ref["o"]).abs().amax(0) > 1e-6
    assert changed.nonzero().squeeze(1).tolist() == h_cols

    group_q = _first_block_inputs(_zeroed(tiny, q=g_cols), ids)["o"]
    group_k = _first_block_inputs(_zeroed(tiny, k=g_rows), ids)["o"]
    torch.testing.assert_close(group_k, group_q)
    torch.testing.assert_close(group_k[:, others], ref["o"][:, others])

    c = cfg.intermediate_size // 2
    out = _first_block_inputs(_zeroed(tiny, v=g_rows, up=[c], gate=[c + 1]), ids)
    assert out["o"][:, g_cols].abs().max() == 0
    torch.testing.assert_close(out["o"][:, others], ref["o"][:, others])
    live = out["down"].abs().amax(0) > 0
    assert live.logical_not().nonzero().squeeze(1).tolist() == [c, c + 1]
    doubled = _first_block_inputs(_zeroed(tiny, 2.0, up=[c]), ids)["down"]
    torch.testing.assert_close(doubled[:, c], 2 * ref["down"][:, c])
    torch.testing.assert_close(doubled[:, c + 1 :], ref["down"][:, c + 1 :])


def test_resize_block_builds_what_slice_block_leaves(tiny):
    """A dense block resized to a plan's widths takes the sliced block's weights (strict load)
    and computes the same: what `load_pruned` and the shipped modeling file rely on."""
    adapter = adapter_for(tiny)
    cfg, hd = tiny.config, adapter.head_dim(tiny.config)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    g = cfg.num_key_value_heads - 1  # keep the last KV group, every third channel
    plan = BlockPlan(
        heads=list(range(g * group, (g + 1) * group)),
        kv_heads=[g],
        channels=list(range(0, cfg.intermediate_size, 3)),
    )
    sliced = copy.deepcopy(tiny)
    adapter.slice_block(adapter.layers(sliced)[1], plan, hd)
    rebuilt = copy.deepcopy(tiny)
    adapter.resize_block(adapter.layers(rebuilt)[1], plan.widths(), hd)
    rebuilt.load_state_dict(sliced.state_dict(), strict=True)
    assert adapter.block_widths(rebuilt)[1] == plan.widths()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, sliced(ids).logits)


def test_per_block_widths_survive_deepcopy_and_attention_switch(tiny):
    """Blocks narrower than the config (per-block views where a forward reads the config) stay
    right through deepcopy (speed measurement copies models) and an attention-backend change."""
    adapter = adapter_for(tiny)
    hd = adapter.head_dim(tiny.config)
    group = tiny.config.num_attention_heads // tiny.config.num_key_value_heads
    plan = BlockPlan(heads=list(range(group)), kv_heads=[0], channels=[0, 2, 4, 6])
    adapter.slice_block(adapter.layers(tiny)[0], plan, hd)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny(ids).logits
        torch.testing.assert_close(copy.deepcopy(tiny)(ids).logits, ref)
        tiny.set_attn_implementation("eager")
        torch.testing.assert_close(tiny(ids).logits, ref, atol=1e-4, rtol=1e-4)
