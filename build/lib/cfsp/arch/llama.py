"""LLaMA family (Llama 2/3, SmolLM2, TinyLlama): MHA or GQA, optional biases by config flags.

`attention_bias` puts a bias on q, k, v AND o; `mlp_bias` on gate, up AND down. Turning either
flag on with zero biases where nothing is compensated keeps a reconstructed checkpoint loadable
by stock `from_pretrained`.
"""

from cfsp.arch.base import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    name = "llama"
    model_types = ("llama",)
    qkv_bias_attr = "attention_bias"
    o_bias_attr = "attention_bias"
    mlp_bias_attr = "mlp_bias"
