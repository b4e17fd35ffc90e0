"""Per-block widths for stock LLaMA-style models. Standalone: no cfsp import.

A CFSP checkpoint whose blocks have different widths lists them in `config.cfsp_layer_widths`
(one {num_attention_heads, num_key_value_heads, intermediate_size} per block). Stock modeling
code builds every block at the config's dense width; `resize_to_layer_widths` rebuilds each
block's projections at its own width before the weights are loaded. `config.cfsp_extra_bias`
lists projections that carry a compensation bias the stock config cannot express.

Projections are known by name. One that produces roles stacks their rows in order: q_proj = [q],
Phi-3's qkv_proj = [q; k; v] and gate_up_proj = [gate; up] (q: heads * head_dim rows, k and v:
kv_heads * head_dim, gate and up: intermediate). o_proj and down_proj take q's and gate's rows
as input columns.

Some stock forwards read a width from the shared config instead of the module (Phi-3 splits
qkv at config.num_attention_heads * head_dim). A block whose head counts differ from the
config's gets a `BlockConfig` as its attention's `config`: the block's own head counts,
everything else read live from the model's config. The stock forward runs unchanged.

cfsp.load_pruned(DIR) uses this module directly, and cfsp's adapters call it when they slice a
block. The same file is copied into each per-block checkpoint with an `auto_map`, so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (and lm-eval's hf model
with trust_remote_code=True) load it too.
"""

from torch import nn

# output projection name -> the roles whose rows it stacks, in row order
_ROW_ROLES = {
    "q_proj": ("q",),
    "k_proj": ("k",),
    "v_proj": ("v",),
    "qkv_proj": ("q", "k", "v"),
    "gate_proj": ("gate",),
    "up_proj": ("up",),
    "gate_up_proj": ("gate", "up"),
}
# input projection name -> the role whose rows are its input columns
_COLUMN_ROLE = {"o_proj": "q", "down_proj": "gate"}


class BlockConfig:
    """One block's view of the model config: its own head counts, the rest read live.

    Reads of any other attribute (and writes to it) go to the shared config, so a later change
    such as the attention implementation reaches every block. Plain state, so deepcopy works.
    """

    def __init__(self, shared, **own):
        self.__dict__.update(own, _shared=shared)

    def __getattr__(self, name):  # only called when `name` is not one of the block's own
        shared = self.__dict__.get("_shared")
        if shared is None:  # during copy/unpickle, before the state is restored
            raise AttributeError(name)
        return getattr(shared, name)

    def __setattr__(self, name, value):
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self._shared, name, value)

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self):
        own = {k: v for k, v in self.__dict__.items() if k != "_shared"}
        return f"BlockConfig({type(self._shared).__name__}, {own})"


def set_attention_widths(attn, heads, kv):
    """Set what the stock attention forward reads: module attributes, and a `BlockConfig`
    when the block's head counts differ from its model config's."""
    attn.num_key_value_groups = heads // kv
    for attr, value in (("num_heads", heads), ("num_key_value_heads", kv)):
        if hasattr(attn, attr):
            setattr(attn, attr, value)
    config = getattr(attn, "config", None)
    if config is None:
        return
    shared = config._shared if isinstance(config, BlockConfig) else config
    if (shared.num_attention_heads, shared.num_key_value_heads) == (heads, kv):
        attn.config = shared
    else:
        attn.config = BlockConfig(shared, num_attention_heads=heads, num_key_value_heads=kv)


def set_mlp_width(mlp, inter):
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = inter


def _linear(old, in_features, out_features, bias):
    return nn.Linear(
        in_features, out_features, bias=bias, dtype=old.weight.dtype, device=old.weight.device
    )


def resize_block(attn, mlp, heads, kv, inter, head_dim, extra_bias=()):
    """Rebuild every known projection of one block at the given widths (uninitialised)."""
    rows = {
        "q": heads * head_dim,
        "k": kv * head_dim,
        "v": kv * head_dim,
        "gate": inter,
        "up": inter,
    }
    for owner in (attn, mlp):
        for name, old in list(owner.named_children()):
            if not isinstance(old, nn.Linear):
                continue
            if name in _ROW_ROLES:
                shape = (old.in_features, sum(rows[r] for r in _ROW_ROLES[name]))
            elif name in _COLUMN_ROLE:
                shape = (rows[_COLUMN_ROLE[name]], old.out_features)
            else:
                continue
            bias = old.bias is not None or name in extra_bias
            setattr(owner, name, _linear(old, *shape, bias))
    set_attention_widths(attn, heads, kv)
    set_mlp_width(mlp, inter)


def resize_to_layer_widths(model, config):
    widths = getattr(config, "cfsp_layer_widths", None)
    extra_bias = set(getattr(config, "cfsp_extra_bias", None) or ())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    uniform = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    for layer_index, layer in enumerate(model.model.layers):
        if widths is not None:
            w = widths[layer_index]
            heads, kv, inter = (
                w["num_attention_heads"],
                w["num_key_value_heads"],
                w["intermediate_size"],
            )
        else:
            heads, kv, inter = uniform
        resize_block(layer.self_attn, layer.mlp, heads, kv, inter, head_dim, extra_bias)
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

try:  # newer families, each on its own: an older transformers without them keeps the rest
    from transformers import Qwen3ForCausalLM

    CfspQwen3ForCausalLM = _remote_class(Qwen3ForCausalLM)
except ImportError:  # pragma: no cover
    pass

try:
    from transformers import Phi3ForCausalLM

    CfspPhi3ForCausalLM = _remote_class(Phi3ForCausalLM)
except ImportError:  # pragma: no cover
    pass

try:  # Gemma 3 text (gemma3_text): same roles; q_norm / k_norm are per head_dim and stay
    from transformers import Gemma3ForCausalLM

    CfspGemma3ForCausalLM = _remote_class(Gemma3ForCausalLM)
except ImportError:  # pragma: no cover
    pass
