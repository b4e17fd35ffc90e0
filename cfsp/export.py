"""Save and load pruned checkpoints: safetensors weights, config, tokenizer, manifest.

Uniform widths (and LLaMA biases through its config flags) load with stock
`AutoModelForCausalLM.from_pretrained(DIR)`. Per-block widths record `cfsp_layer_widths` in
config.json and ship `modeling_cfsp.py` with an `auto_map`: `cfsp.load_pruned(DIR)` loads them
without remote code; stock loading needs `trust_remote_code=True`, which is never the default.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from cfsp.errors import CfspError
from cfsp.io import read_json, sha256_file, write_json

MANIFEST = "cfsp_manifest.json"
MODELING_FILE = Path(__file__).with_name("modeling_cfsp.py")
# Terms of use that travel with a model and every checkpoint derived from it (Gemma's terms
# ask that derivatives carry them): copied from the manifest's source_path when present.
TERMS_PATTERNS = ("*TERMS*", "LICENSE*", "NOTICE*", "USE_POLICY*")


def weight_hashes(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.glob("*.safetensors"))}


def save_checkpoint(model, tokenizer, out: Path, manifest: dict) -> None:
    """Write into `out` (a fresh temporary directory from `atomic_dir`)."""
    config = model.config
    if getattr(config, "cfsp_layer_widths", None) or getattr(config, "cfsp_extra_bias", None):
        arch = type(model).__name__
        config.auto_map = {"AutoModelForCausalLM": f"modeling_cfsp.Cfsp{arch}"}
        shutil.copy(MODELING_FILE, out / "modeling_cfsp.py")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    copy_terms(manifest.get("source_path"), out)
    manifest = dict(manifest, weights_sha256=weight_hashes(out))
    write_json(out / MANIFEST, manifest)


def copy_terms(source: str | Path | None, out: Path) -> list[str]:
    """Copy the source model's terms / license / notice files into `out`; return their names."""
    source = Path(source) if source else None
    if source is None or not source.is_dir():
        return []
    names = sorted({p.name for pat in TERMS_PATTERNS for p in source.glob(pat) if p.is_file()})
    for name in names:
        shutil.copy(source / name, out / name)
    return names


def _empty_model(config):
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older releases: random init costs time, not correctness
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config)


def load_pruned(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Load any cfsp checkpoint (uniform or per-block widths) without remote code."""
    from transformers import AutoConfig

    from cfsp.modeling_cfsp import resize_to_layer_widths
    from cfsp.models import check_checkpoint_dir

    directory = Path(directory)
    check_checkpoint_dir(directory)  # regular files, sound headers: before anything is read
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "auto_map"):
        del config.auto_map  # build with the stock class; resizing is done here, not remotely
    model = _empty_model(config)
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(path)))
    try:  # edited widths (cfsp_layer_widths) that do not fit the weights: one clear error
        resize_to_layer_widths(model, config)
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError, TypeError, LookupError, ArithmeticError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CfspError(
            f"checkpoint {directory}: cfsp_layer_widths in config.json do not match the "
            f"weights ({first})"
        ) from err
    model.tie_weights()
    missing = [k for k in result.missing_keys if not _is_tied(model, k)]
    if missing or result.unexpected_keys:
        raise CfspError(
            f"checkpoint {directory} does not match its config: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(dtype).eval()


def _is_tied(model, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def read_manifest(directory: str | Path) -> dict:
    return read_json(Path(directory) / MANIFEST, expect=dict)


def verify_checkpoint(directory: str | Path) -> list[str]:
    """Compare every weight file with the sha256 its manifest records; return the problems."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    recorded = manifest.get("weights_sha256") or {}
    if not isinstance(recorded, dict):
        return [f"weights_sha256 in {MANIFEST} is not a mapping of file names to hashes"]
    actual = weight_hashes(directory)
    problems = [
        f"{name}: recorded in the manifest but missing" for name in recorded if name not in actual
    ]
    problems += [f"{name}: not recorded in the manifest" for name in actual if name not in recorded]
    problems += [
        f"{name}: sha256 {actual[name][:12]}... != recorded {recorded[name][:12]}..."
        for name in actual
        if name in recorded and actual[name] != recorded[name]
    ]
    return problems
