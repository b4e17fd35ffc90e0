import pytest
import torch
from transformers import AutoModelForCausalLM

from cfsp.config import PruneConfig
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.export import load_pruned, save_checkpoint
from tests.conftest import TINY, random_windows, tiny_model


def _prune(name, cfg):
    model = tiny_model(name)
    windows = random_windows()
    prune_model(model, capture(model, windows, progress=False), cfg)
    return model, windows


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("reconstruct", ["none", "liar"])
def test_uniform_roundtrip_with_stock_loader(tmp_path, tiny_tokenizer, name, reconstruct):
    model, windows = _prune(
        name,
        PruneConfig(budget=0.4, method="wanda_sp", reconstruct=reconstruct, structures="ffn+heads"),
    )
    assert getattr(model.config, "cfsp_layer_widths", None) is None
    extra_bias = getattr(model.config, "cfsp_extra_bias", None)
    # LLaMA's config flags express every compensation bias; without reconstruction there is none
    assert not extra_bias or not (name.startswith("llama") or reconstruct == "none")
    save_checkpoint(model, tiny_tokenizer, tmp_path, {"test": True})
    ref = _logits(model, windows.ids)
    torch.testing.assert_close(_logits(load_pruned(tmp_path), windows.ids), ref)
    loader = {"trust_remote_code": True} if extra_bias else {}  # the shipped modeling file
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, **loader).eval()
    torch.testing.assert_close(_logits(stock, windows.ids), ref)


@pytest.mark.parametrize("name", list(TINY))
def test_per_block_roundtrip(tmp_path, tiny_tokenizer, name):
    model, windows = _prune(
        name, PruneConfig(budget=0.4, method="cfsp", temperature=0.2, structures="ffn+heads")
    )
    widths = model.config.cfsp_layer_widths
    assert widths and len({tuple(w.values()) for w in widths}) > 1
    save_checkpoint(model, tiny_tokenizer, tmp_path, {"test": True})
    ref = _logits(model, windows.ids)
    torch.testing.assert_close(_logits(load_pruned(tmp_path), windows.ids), ref)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(remote, windows.ids), ref)
    with pytest.raises(Exception):  # noqa: B017 - stock code cannot build per-block widths
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_only_compensated_modules_keep_a_bias(tmp_path, tiny_tokenizer):
    """FFN-only LIAR compensates down_proj alone: no zero bias is left on q/k/v/o/gate/up
    (each would cost an addmm), and the checkpoint says which kind carries one."""
    model, windows = _prune("llama-gqa", PruneConfig(budget=0.4, structures="ffn"))
    for layer in model.model.layers:
        assert layer.mlp.down_proj.bias is not None
        others = [layer.mlp.gate_proj, layer.mlp.up_proj, layer.self_attn.o_proj]
        assert all(m.bias is None for m in [*others, layer.self_attn.q_proj])
    config = model.config
    assert config.cfsp_extra_bias == ["down_proj"] and not config.attention_bias
    assert not config.mlp_bias
    save_checkpoint(model, tiny_tokenizer, tmp_path, {})
    ref = _logits(model, windows.ids)
    torch.testing.assert_close(_logits(load_pruned(tmp_path), windows.ids), ref)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(remote, windows.ids), ref)
