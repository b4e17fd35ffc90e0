"""Qwen3: the LLaMA layout with an RMSNorm over head_dim on every query and key head (q_norm,
k_norm) and an explicit head_dim (not hidden / heads).

q_norm / k_norm weights are [head_dim], shared by all heads of the block and applied per head
after the projection is viewed as [..., heads, head_dim]: removing heads leaves them as they
are, so nothing there is sliced. `attention_bias` puts a bias on q, k, v AND o (as in LLaMA);
the FFN never has one (no `mlp_bias` flag), so its compensation bias is `cfsp_extra_bias`.
"""

from cfsp.arch.base import DecoderAdapter


class Qwen3Adapter(DecoderAdapter):
    name = "qwen3"
    model_types = ("qwen3",)
    qkv_bias_attr = "attention_bias"
    o_bias_attr = "attention_bias"
