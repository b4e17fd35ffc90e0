"""The padded export: a pruned model zero-padded back to its config's uniform widths.

Stock modeling code builds every block at the config's widths. A compact checkpoint whose
blocks differ (`cfsp_layer_widths`) or whose o_proj / down_proj carry a compensation bias the
stock config cannot express (`cfsp_extra_bias`) needs cfsp's loader or the shipped modeling
file. The padded model computes exactly the same function with stock code only:

* every block is rebuilt at the dense widths; each kept head / channel goes back to its dense
  index (from the manifest's `prune.kept`), every removed one is zero: zero q/k/v rows and o
  columns for a removed head (k/v rows for a removed KV group, so GQA's head -> group map is the
  dense one), zero gate/up rows and down columns for a removed FFN channel. A zero o column or
  down column contributes nothing, whatever the zero rows before it compute;
* a compensation bias is kept by turning on the stock flag that builds it (LLaMA's
  `attention_bias` / `mlp_bias`, Qwen3's and Gemma 3's `attention_bias`); the other modules the
  flag builds get zero biases. Mistral and Qwen2 have no such flags, but without a sliding
  window they are exactly LLaMA: their padded export is a LLaMA checkpoint (cfsp.export_llama).
  Any other family without the flag cannot hold the bias in stock code: the padded export is
  refused there (prune with reconstruct=none, or use the compact export).

It gives up the speed-up: the padded model has the dense model's shapes and cost.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cfsp.arch import adapter_for
from cfsp.arch.base import BlockWidths, head_rows
from cfsp.errors import CfspError

# compensated module -> (the role in adapter.parts, the adapter's flag attribute)
_BIAS_KINDS = {"o_proj": ("o", "o_bias_attr"), "down_proj": ("down", "mlp_bias_attr")}


def unflagged_biases(model) -> list[str]:
    """The compensated module kinds (o_proj, down_proj) the family's stock config cannot build."""
    adapter = adapter_for(model)
    names = getattr(model.config, "cfsp_extra_bias", None) or ()
    return [n for n in names if n in _BIAS_KINDS and getattr(adapter, _BIAS_KINDS[n][1]) is None]


def stock_bias_problem(model) -> str | None:
    """Why stock code cannot hold the model's compensation biases, if it can't (neither its
    family's flags nor, for Mistral / Qwen2, the LLaMA form)."""
    from cfsp.export_llama import llama_form_problem

    missing = unflagged_biases(model)
    if not missing:
        return None
    why = llama_form_problem(model.config)
    if why is None:
        return None
    return (
        f"{type(model).__name__} has no config flag that builds a bias on {missing[0]}, where "
        f"the reconstruction put one, and {why}: stock code cannot compute this model. Prune "
        "with reconstruct=none, or use the compact export (cfsp.export.load_pruned, or "
        "from_pretrained(DIR, trust_remote_code=True) with its shipped modeling_cfsp.py)"
    )


def padded_copy(model, kept: list[dict]):
    """A copy of `model` padded to its config's widths with stock bias flags (see module doc).

    `kept` is the manifest's `prune.kept`: per block, the dense indices of the kept heads,
    KV heads and channels, in the compact block's order."""
    problem = stock_bias_problem(model)
    if problem:
        raise CfspError(f"padded export: {problem}")
    padded = copy.deepcopy(model)
    adapter = adapter_for(padded)
    config = padded.config
    head_dim = adapter.head_dim(config)
    dense = BlockWidths(
        config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    )
    blocks = adapter.layers(padded)
    if len(kept) != len(blocks):
        raise CfspError(
            f"padded export: the manifest records kept indices for {len(kept)} blocks, the "
            f"model has {len(blocks)}"
        )
    with torch.no_grad():
        for index, (block, plan) in enumerate(zip(blocks, kept, strict=True)):
            _pad_block(adapter, block, plan, dense, head_dim, index)
    to_llama = bool(unflagged_biases(padded))
    for attr in ("cfsp_layer_widths", "cfsp_extra_bias"):
        if hasattr(config, attr):
            delattr(config, attr)
    if to_llama:  # Mistral / Qwen2 with a bias their config cannot build: the LLaMA form
        from cfsp.export_llama import as_llama

        return as_llama(padded, adapter)
    _set_bias_flags(padded, adapter)
    return padded


def _rows(plan: dict, head_dim: int) -> dict[str, torch.Tensor]:
    chans = torch.tensor(plan["channels"], dtype=torch.long)
    q, kv = head_rows(plan["heads"], head_dim), head_rows(plan["kv_heads"], head_dim)
    return {"q": q, "k": kv, "v": kv, "gate": chans, "up": chans}


def _pad_block(adapter, block, plan: dict, dense: BlockWidths, head_dim: int, index: int) -> None:
    """Rebuild one block at `dense` widths: kept rows / columns at their dense indices."""
    old = adapter.parts(block)
    rows = _rows(plan, head_dim)
    widths = {r: getattr(old, r).out_features for r in rows}
    if any(widths[r] != len(rows[r]) for r in rows):
        raise CfspError(
            f"padded export: block {index} holds widths {widths} but the manifest's kept "
            f"indices give { ({r: len(v) for r, v in rows.items()}) }"
        )
    saved = {r: _params(getattr(old, r)) for r in rows}
    saved_o, saved_down = _params(old.o), _params(old.down)
    extra = [
        name
        for name, module in (("o_proj", old.o), ("down_proj", old.down))
        if module.bias is not None
    ]
    adapter.resize_block(block, dense, head_dim, extra_bias=extra)
    new = adapter.parts(block)
    for module in {id(m): m for m in _linears(new)}.values():
        module.weight.zero_()
        if module.bias is not None:
            module.bias.zero_()
    for role, (weight, bias) in saved.items():
        view = getattr(new, role)
        view.weight[rows[role]] = weight
        if bias is not None:
            view.bias[rows[role]] = bias
    for module, cols, (weight, bias) in (
        (new.o, rows["q"], saved_o),
        (new.down, rows["gate"], saved_down),
    ):
        module.weight[:, cols] = weight
        if bias is not None:
            module.bias.copy_(bias)


def _params(part) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = part.bias
    return part.weight.detach().clone(), None if bias is None else bias.detach().clone()


def _linears(parts) -> list[nn.Linear]:
    return [parts.q.linear, parts.k.linear, parts.v.linear, parts.o] + [
        parts.gate.linear,
        parts.up.linear,
        parts.down,
    ]


def _set_bias_flags(model, adapter) -> None:
    """Turn on the stock flag for every compensated module kind and give each module that the
    flag builds a zero bias where it has none, so stock code builds exactly these modules."""
    config = model.config
    parts = [adapter.parts(b) for b in adapter.layers(model)]
    for role, flag_attr in _BIAS_KINDS.values():
        if not any(getattr(p, role).bias is not None for p in parts):
            continue
        flag = getattr(adapter, flag_attr)
        if adapter.has_bias(config, "o" if role == "o" else "mlp"):
            continue
        setattr(config, flag, True)
        for p in parts:
            for module in _built_by(adapter, p, flag):
                if module.bias is None:
                    module.bias = nn.Parameter(
                        torch.zeros(
                            module.out_features,
                            dtype=module.weight.dtype,
                            device=module.weight.device,
                        )
                    )


def _built_by(adapter, parts, flag: str) -> list[nn.Linear]:
    """The modules a stock bias flag gives a bias."""
    modules = []
    if adapter.qkv_bias_attr == flag:
        modules += [parts.q.linear, parts.k.linear, parts.v.linear]
    if adapter.o_bias_attr == flag:
        modules.append(parts.o)
    if adapter.mlp_bias_attr == flag:
        modules += [parts.gate.linear, parts.up.linear, parts.down]
    return list({id(m): m for m in modules}.values())
