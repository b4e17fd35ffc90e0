"""Mistral and Qwen2 models with compensation biases, written as stock LLaMA models.

Reconstruction (LIAR) can add a bias on o_proj / down_proj. Mistral's and Qwen2's stock configs
have no flag that builds one there, but without a sliding window both compute exactly what
LLaMA computes with the same weights: the same RMSNorm, rotary embedding, GQA attention
(head_dim^-0.5 scaling) and gated MLP. LLaMA's `attention_bias` builds biases on q, k, v and o,
`mlp_bias` on gate, up and down; each module of those that the model has no bias on gets a zero
one (Qwen2's q/k/v biases are kept). So the stock-loadable exports (padded, uniform) of such a
model are LLaMA checkpoints: `model_type: llama`, the same function, loadable by every tool
that loads LLaMA. A sliding window (Mistral v0.1, Qwen2 with use_sliding_window) has no LLaMA
form; those exports stay refused.
"""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = ("mistral", "qwen2")


def llama_form_problem(config) -> str | None:
    """Why this config's model has no exact stock LLaMA form (None: it has one)."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"{kind} has no stock LLaMA form"
    window = getattr(config, "sliding_window", None)
    if kind == "mistral" and window is not None and window < config.max_position_embeddings:
        return (
            f"its sliding window ({window} tokens, below max_position_embeddings "
            f"{config.max_position_embeddings}) has no LLaMA form"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if kind == "qwen2" and (
        getattr(config, "use_sliding_window", False)
        or any(t != "full_attention" for t in layer_types)
    ):
        return "its sliding-window layers have no LLaMA form"
    return None


def _llama_config(source, attention_bias: bool, mlp_bias: bool):
    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict()) - {"model_type", "architectures", "transformers_version"}
    values = {k: v for k, v in source.to_dict().items() if k in known}
    values.update(attention_bias=attention_bias, mlp_bias=mlp_bias)
    config = LlamaConfig(**values)
    config.architectures = ["LlamaForCausalLM"]
    return config


def as_llama(model, adapter):
    """A LlamaForCausalLM computing exactly what `model` (uniform widths, Mistral or Qwen2
    without a sliding window) computes; its weights are `model`'s tensors (not copied)."""
    from transformers import LlamaForCausalLM

    parts = [adapter.parts(block) for block in adapter.layers(model)]
    attention = any(getattr(p, r).bias is not None for p in parts for r in ("q", "k", "v", "o"))
    mlp = any(getattr(p, r).bias is not None for p in parts for r in ("gate", "up", "down"))
    config = _llama_config(model.config, attention, mlp)
    state = model.state_dict()
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    for name, param in llama.state_dict().items():
        if name not in state:  # a bias LLaMA's flag builds and the source lacks: zero
            like = state[name.removesuffix(".bias") + ".weight"]
            state[name] = torch.zeros(param.shape, dtype=like.dtype, device=like.device)
    llama.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inverse frequencies) are not in a state dict: rebuild them.
    with torch.device(next(iter(state.values())).device):
        llama.model.rotary_emb = type(llama.model.rotary_emb)(config=config)
    if config.tie_word_embeddings:
        llama.lm_head.weight = nn.Parameter(llama.model.embed_tokens.weight)
    llama.generation_config = model.generation_config
    return llama.eval()
