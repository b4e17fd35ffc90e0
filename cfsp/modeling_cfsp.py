"""Per-block widths for stock LLaMA-style models. Standalone: no cfsp import.

A CFSP checkpoint whose blocks have different widths lists them in `config.cfsp_layer_widths`
(one {num_attention_heads, num_key_value_heads, intermediate_size} per block). Stock modeling
code builds every block at the config's dense width; `resize_to_layer_widths` rebuilds each
block's projections at its own width before the weights are loaded. `config.cfsp_extra_bias`
lists projections that carry a compensation bias the stock config cannot express.

cfsp.load_pruned(DIR) uses this module directly. The same file is copied into each per-block
checkpoint with an `auto_map`, so `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` (and lm-eval's hf model with trust_remote_code=True) load it too.
"""

from torch import nn

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _linear(old, in_features, out_features, bias):
    return nn.Linear(
        in_features, out_features, bias=bias, dtype=old.weight.dtype, device=old.weight.device
    )


def resize_to_layer_widths(model, config):
    widths = getattr(config, "cfsp_layer_widths", None)
    extra_bias = set(getattr(config, "cfsp_extra_bias", None) or ())
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    for layer_index, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if widths is not None:
            w = widths[layer_index]
            heads, kv, inter = (
                w["num_attention_heads"],
                w["num_key_value_heads"],
                w["intermediate_size"],
            )
        else:
            heads, kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
            inter = mlp.gate_proj.out_features
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv * head_dim),
            "v_proj": (hidden, kv * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        for owner, names in ((attn, _ATTN), (mlp, _MLP)):
            for name in names:
                old = getattr(owner, name)
                bias = old.bias is not None or name in extra_bias
                setattr(owner, name, _linear(old, *shapes[name], bias))
        attn.num_key_value_groups = heads // kv
        for attr, value in (("num_heads", heads), ("num_key_value_heads", kv)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter
    return model


def _remote_class(base):
    class CfspForCausalLM(base):
        def __init__(self, config):
            super().__init__(config)
            resize_to_layer_widths(self, config)

    CfspForCausalLM.__name__ = "Cfsp" + base.__name__
    return CfspForCausalLM


try:  # classes for auto_map; absent families simply are not offered
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    CfspLlamaForCausalLM = _remote_class(LlamaForCausalLM)
    CfspMistralForCausalLM = _remote_class(MistralForCausalLM)
    CfspQwen2ForCausalLM = _remote_class(Qwen2ForCausalLM)
except ImportError:  # pragma: no cover
    pass

try:  # Gemma 3 text (gemma3_text): same roles; q_norm / k_norm are per head_dim and stay
    from transformers import Gemma3ForCausalLM

    CfspGemma3ForCausalLM = _remote_class(Gemma3ForCausalLM)
except ImportError:  # pragma: no cover
    pass
