"""Scale benchmark: random-init checkpoints of public model shapes, and what pruning them costs.

`write` builds a LLaMA checkpoint of a public shape shard by shard without ever holding the
model: the tensor names and shapes come from a model built on the meta device (no memory), each
shard's tensors are generated (linear weights and embeddings ~ N(0, 0.02), norms = 1, bf16),
written and freed. The tokenizer is SmolLM2's (the embedded `smollm2-135m`, or --tokenizer DIR)
and vocab_size is set to its size (49,152 for SmolLM2, not the real models' 32,000 / 128,256):
random weights need no matching vocabulary, and a real one keeps calibration text meaningful.

`measure` runs today's `cfsp prune` on such a checkpoint as a subprocess and records its wall
time, peak RSS, statistics bytes written and one dense forward's time (benchmarks/scale_measure.py).
`--shape smollm2-135m` measures the embedded real model the same way (`EMBEDDED`).

  python -m benchmarks.scale write --shape tinyllama-1.1b --out ~/.cache/cfsp/scale/tinyllama-1.1b
  python -m benchmarks.scale measure --shape tinyllama-1.1b --nsamples 16 --md scale.md
  python -m benchmarks.scale report --md benchmarks/results/scale.md   # table + plot from JSON
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cfsp.io import atomic_dir, parse_shard_size, write_json

log = logging.getLogger("scale")
INIT_STD = 0.02  # the LLaMA initializer_range: activations stay finite through 32 blocks
SEED = 0


@dataclass(frozen=True)
class Shape:
    """A public decoder shape (LLaMA architecture); `tied`: input and output embeddings shared."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    tied: bool
    rope_theta: float
    max_positions: int


SHAPES = {
    "tiny": Shape(2, 64, 160, 4, 2, False, 10000.0, 256),  # tests
    "tinyllama-1.1b": Shape(22, 2048, 5632, 32, 4, False, 10000.0, 2048),
    "llama-3.2-3b": Shape(28, 3072, 8192, 24, 8, True, 500000.0, 131072),  # no rope scaling
    "llama-2-7b": Shape(32, 4096, 11008, 32, 32, False, 10000.0, 4096),
}
# Real checkpoints measured the same way: the embedded models (cfsp.embedded), not written here.
EMBEDDED = {
    "smollm2-135m": Shape(30, 576, 1536, 9, 3, True, 100000.0, 8192),
}


def llama_config(shape: Shape, tokenizer):
    """The transformers config of `shape`, with the tokenizer's vocabulary and special ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=shape.tied,
        initializer_range=INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in checkpoint order, from a meta-device model:
    transformers names them, nothing is allocated. A tied lm_head is not stored."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def _group(name: str) -> int:
    """Which unit a tensor belongs to: -1 before the blocks, block i, or 10**9 after them."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    if match:
        return int(match.group(1))
    return -1 if "embed_tokens" in name else 10**9


def plan_shards(specs, max_bytes: int, itemsize: int = 2) -> list[list[tuple[str, tuple]]]:
    """Tensors grouped into shards: whole blocks, in order, each shard at most `max_bytes`
    unless one block alone is larger (it then gets a shard of its own)."""
    units: dict[int, list] = {}
    for name, shape in specs:
        units.setdefault(_group(name), []).append((name, shape))
    shards: list[list] = [[]]
    size = 0
    for key in sorted(units):
        unit_bytes = sum(itemsize * torch.Size(s).numel() for _, s in units[key])
        if shards[-1] and size + unit_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(units[key])
        size += unit_bytes
    return shards


def random_tensor(name: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Norm weights are ones; every matrix (projections, embeddings) ~ N(0, INIT_STD), bf16."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=generator)


def write_checkpoint(shape_name: str, out: Path, tokenizer_dir: Path, max_shard: str) -> dict:
    """Write the random-init checkpoint of `shape_name` into `out` (atomically), one shard in
    memory at a time; return a summary (parameters, bytes, shards)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig

    shape = SHAPES[shape_name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = llama_config(shape, tokenizer)
    shards = plan_shards(tensor_specs(config), parse_shard_size(max_shard))
    generator = torch.Generator().manual_seed(SEED)
    weight_map, total, params = {}, 0, 0
    with atomic_dir(out) as tmp:
        for k, specs in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {t: random_tensor(t, s, generator) for t, s in specs}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            params += sum(t.numel() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors  # the next shard is generated only after this one is freed
            log.info("%s: wrote %s (%d of %d)", shape_name, name, k, len(shards))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(tmp / "model.safetensors.index.json", index)
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {
        "shape": shape_name,
        **asdict(shape),
        "vocab": config.vocab_size,
        "params": params,
        "weights_bytes": total,
        "shards": len(shards),
    }


def finite_forward(directory: Path, tokens: int = 16) -> bool:
    """Load the checkpoint as cfsp does (bf16) and check one forward's logits are finite."""
    from cfsp.models import load_model

    loaded = load_model(str(directory), dtype="bfloat16")
    ids = torch.arange(tokens).unsqueeze(0) % loaded.model.config.vocab_size
    with torch.no_grad():
        logits = loaded.model(ids, use_cache=False).logits
    return bool(torch.isfinite(logits).all())


def _default_tokenizer() -> Path:
    from cfsp.embedded import embedded_checkpoint

    return embedded_checkpoint("smollm2-135m")


def main(argv: list[str] | None = None) -> None:
    from benchmarks.scale_measure import add_measure_args, measure, report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write a random-init checkpoint of a public shape")
    write.add_argument("--shape", choices=list(SHAPES), required=True)
    write.add_argument("--out", type=Path, required=True)
    write.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: SmolLM2's)")
    write.add_argument("--max-shard-size", default="2GB")
    write.add_argument("--check", action="store_true", help="load it and check a finite forward")
    add_measure_args(sub.add_parser("measure", help="prune a shape and record its cost"))
    add_measure_args(sub.add_parser("report", help="rewrite the table and plot from the JSON"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "write":
        summary = write_checkpoint(
            args.shape, args.out, args.tokenizer or _default_tokenizer(), args.max_shard_size
        )
        if args.check:
            summary["forward_finite"] = finite_forward(args.out)
        print(summary)
    elif args.command == "measure":
        measure(args, lambda shape, out: write_checkpoint(shape, out, _tok(args), "2GB"))
    else:
        report(args)


def _tok(args) -> Path:
    return args.tokenizer or _default_tokenizer()


if __name__ == "__main__":
    main()
