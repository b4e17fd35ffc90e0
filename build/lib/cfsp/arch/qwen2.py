"""Qwen2 / Qwen2.5: the LLaMA layout with biases on q, k and v (always), none on o or the FFN."""

from cfsp.arch.base import DecoderAdapter


class Qwen2Adapter(DecoderAdapter):
    name = "qwen2"
    model_types = ("qwen2",)
    qkv_bias_always = True
