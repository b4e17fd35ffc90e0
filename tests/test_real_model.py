"""End to end on the real embedded SmolLM2-135M, with few tokens (CPU-sized)."""

import math

import pytest
import torch

from cfsp.arch import adapter_for
from cfsp.config import CalibConfig, PruneConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    from cfsp.models import load_model

    return load_model("smollm2-135m")


def test_real_model_contract_and_perplexity(real):
    from cfsp.data import evaluation_windows
    from cfsp.evaluation.perplexity import perplexity

    adapter = adapter_for(real.model)
    widths = adapter.block_widths(real.model)
    assert len(widths) == 30
    assert {(w.num_heads, w.num_kv_heads, w.intermediate) for w in widths} == {(9, 3, 1536)}
    p = adapter.parts(adapter.layers(real.model)[0])
    assert p.q.weight.shape == (576, 576) and p.k.weight.shape == (192, 576)
    windows = evaluation_windows("botchan", real.tokenizer, 64, limit=4, model=real.model)
    result = perplexity(real.model, windows, progress=False)
    assert result["tokens_scored"] == 4 * 63
    assert 10 < result["ppl"] < 300 and math.isfinite(result["ppl"])


def test_real_prune_save_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    from cfsp.models import load_model
    from cfsp.pruning import prune_to_checkpoint

    out = tmp_path / "pruned"
    manifest = prune_to_checkpoint(
        "smollm2-135m", CalibConfig(nsamples=8, seqlen=64), PruneConfig(budget=0.3), out
    )
    assert abs(manifest["prune"]["achieved_fraction"] - 0.3) < 0.01
    assert manifest["params_after"] < manifest["params_before"]
    widths = manifest["prune"]["widths"]
    assert len({tuple(w.values()) for w in widths}) > 1  # cfsp allocation is not uniform
    ids = torch.randint(0, 49152, (1, 16))
    ours = load_model(str(out)).model
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, ours(ids).logits)
    from cfsp.pruning import count_params

    assert count_params(ours) == manifest["params_after"]
