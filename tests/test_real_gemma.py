"""End to end on the real embedded Gemma 3 270M (gemma3_text), with few tokens (CPU-sized).

Covers what the tiny Gemma cannot: the real geometry (one KV head, head_dim 256, tied and
scaled embeddings, 5 sliding : 1 global layers), greedy text, pruning equals masking on real
weights, and a per-block checkpoint that reloads with identical logits both ways.
"""

import copy

import pytest
import torch

from cfsp.arch import adapter_for
from cfsp.config import PruneConfig

pytestmark = pytest.mark.slow

SPEC = "gemma3-270m"


@pytest.fixture(scope="module")
def real():
    from cfsp.models import load_model

    return load_model(SPEC)


@pytest.fixture(scope="module")
def windows(real):
    from cfsp.data import calibration_windows

    return calibration_windows("botchan", real.tokenizer, 8, 64, 0, real.model)


def test_real_gemma_geometry_generation_and_perplexity(real):
    from cfsp.data import evaluation_windows
    from cfsp.evaluation.perplexity import perplexity

    cfg = real.model.config
    assert cfg.model_type == "gemma3_text" and cfg.tie_word_embeddings
    assert {"sliding_attention", "full_attention"} == set(cfg.layer_types)
    adapter = adapter_for(real.model)
    assert adapter.head_dim(cfg) == 256 != cfg.hidden_size // cfg.num_attention_heads
    widths = adapter.block_widths(real.model)
    assert len(widths) == cfg.num_hidden_layers == len(cfg.layer_types)
    assert {(w.num_heads, w.num_kv_heads, w.intermediate) for w in widths} == {(4, 1, 2048)}
    assert real.model.lm_head.weight is adapter.embed(real.model).weight
    ids = real.tokenizer("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        out = real.model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = real.tokenizer.decode(out[0, ids.input_ids.shape[1] :])
    assert "return" in text, text
    windows = evaluation_windows("botchan", real.tokenizer, 64, limit=4, model=real.model)
    # Gemma's tokenizer puts BOS before text and the model leans on it at position 0 (728 vs
    # 38 perplexity on these tokens): every window is BOS + 63 text tokens.
    assert windows.fingerprint["bos"] == real.tokenizer.bos_token_id
    assert (windows.ids[:, 0] == real.tokenizer.bos_token_id).all()
    assert (windows.ids[:, 1:] != real.tokenizer.bos_token_id).all()
    result = perplexity(real.model, windows, progress=False)
    assert 5 < result["ppl"] < 100  # a sound model, scored as it was trained
    without = perplexity(real.model, type(windows)(windows.ids[:, 1:]), progress=False)
    assert without["ppl"] > 5 * result["ppl"]  # the same text without BOS: off-distribution


@pytest.fixture(scope="module")
def stats(real, windows):
    from cfsp.engine.capture import capture

    return capture(real.model, windows, progress=False)


def test_real_gemma_pruning_equals_masking(real, windows, stats):
    """Heads and channels sliced out == the same heads and channels zeroed in the dense model
    (no reconstruction): the adapter slices the right rows and columns on real weights."""
    from cfsp.engine.driver import prune_model

    pruned, masked = copy.deepcopy(real.model), copy.deepcopy(real.model)
    cfg = PruneConfig(budget=0.3, reconstruct="none", structures="ffn+heads")
    report = prune_model(pruned, stats, cfg)
    assert abs(report.achieved_fraction - 0.3) < 0.01
    assert all(1 <= len(p.heads) <= 4 and p.kv_heads == [0] for p in report.plans)
    assert any(len(p.heads) < 4 for p in report.plans)
    adapter, hd = adapter_for(masked), adapter_for(masked).head_dim(masked.config)
    with torch.no_grad():
        for block, plan in zip(adapter.layers(masked), report.plans, strict=True):
            p = adapter.parts(block)
            for h in set(range(p.q.out_features // hd)) - set(plan.heads):
                p.o.weight[:, h * hd : (h + 1) * hd] = 0
            for c in set(range(p.down.in_features)) - set(plan.channels):
                p.down.weight[:, c] = 0
        ids = windows.ids[:2]
        ours, ref = pruned(ids, use_cache=False).logits, masked(ids, use_cache=False).logits
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)


def test_real_gemma_prune_save_reload(tmp_path, real, windows, stats):
    """LIAR-reconstructed, per-block widths with compensation biases: saved, then reloaded by
    cfsp (no remote code) and by the shipped modeling file, with the same logits."""
    from transformers import AutoModelForCausalLM

    from cfsp.engine.driver import prune_model
    from cfsp.evaluation.from_spec import count_params
    from cfsp.export import save_checkpoint
    from cfsp.models import load_model

    model = copy.deepcopy(real.model)
    report = prune_model(model, stats, PruneConfig(budget=0.3, structures="ffn+heads"))
    assert len({p.widths() for p in report.plans}) > 1
    assert model.config.cfsp_extra_bias  # compensation biases the stock config cannot express
    out = tmp_path / "pruned"
    out.mkdir()
    save_checkpoint(model, real.tokenizer, out, {"source_path": real.path})
    assert (out / "GEMMA_TERMS.html").is_file()  # the terms travel with derived checkpoints
    loaded = load_model(str(out)).model
    assert count_params(loaded) == count_params(model) < count_params(real.model)
    assert loaded.config.layer_types == real.model.config.layer_types
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = windows.ids[:2]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, ref)
        torch.testing.assert_close(remote(ids, use_cache=False).logits, ref)
