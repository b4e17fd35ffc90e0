"""One contract suite, run against every adapter on tiny configs (and the real model once)."""

import pytest
import torch
from transformers import AutoConfig

from cfsp.arch import SUPPORTED, adapter_for
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
