"""Gemma 3 text models (model_type `gemma3_text`, Gemma3ForCausalLM: Gemma 3 270M, 1B).

The LLaMA roles (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj) with Gemma's extras, none
of which pruning slices or needs to touch:
* q_norm / k_norm normalise every head over head_dim: one weight shared by all heads, so it
  stays as it is when heads go;
* four norms per block: the attention and FFN outputs pass post_attention_layernorm /
  post_feedforward_layernorm before the residual add. Capture hooks the inputs of o_proj and
  down_proj and reconstruction fits those modules' own outputs, which come BEFORE the post-norms
  (the norms then rescale each token as they did before pruning);
* head_dim is explicit (256 on 270M, not hidden / heads = 160): geometry reads config.head_dim;
* one KV head on the small models: only query heads can go, a block keeps >= 1 (allocate);
* attention scale from query_pre_attn_scalar, scaled (sqrt(hidden)) embeddings, tied lm_head,
  the sliding / global pattern (layer_types, sliding_window, two rope bases): untouched. Blocks
  of each layer type get their own mask and rotary inputs (capture catches one set per type).
`attention_bias` puts a bias on q, k, v AND o; the FFN has no bias flag, so a compensation bias
on down_proj is recorded in `cfsp_extra_bias` (loaded by cfsp.load_pruned / modeling_cfsp.py).
"""

from cfsp.arch.base import DecoderAdapter


class Gemma3Adapter(DecoderAdapter):
    name = "gemma3"
    model_types = ("gemma3_text",)
    qkv_bias_attr = "attention_bias"
    o_bias_attr = "attention_bias"
