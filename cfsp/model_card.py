"""The Hugging Face model card (`README.md`) written into every cfsp checkpoint.

Front matter the hub reads (base_model where a hub id is known, library_name, tags), then what
a reader needs before using the weights: how they were made (method, budget, achieved removal,
calibration), what quality was measured, and how to load each export kind.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

CARD = "README.md"
# Embedded model specs -> the hub model their GGUF was converted from.
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

LOADING = {
    "compact": (
        "Compact export: the pruned widths, the speed-up. If the blocks have different widths "
        "(or carry a bias stock code cannot build), config.json says `model_type: cfsp_<type>` "
        "and a plain `AutoModelForCausalLM.from_pretrained(DIR)` stops asking for "
        "`trust_remote_code=True`. Load it with `cfsp.load_pruned(DIR)` (no remote code), or "
        "with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (runs the "
        "shipped `modeling_cfsp.py`; `cfsp verify DIR` checks it against the manifest first)."
    ),
    "padded": (
        "Padded export: zero-padded back to the dense widths, so every stock consumer "
        "(`AutoModelForCausalLM.from_pretrained(DIR)`, `lm_eval --model hf`, serving stacks) "
        "loads it with no custom code and gets exactly the compact model's outputs. It gives "
        "up the speed-up: it has the dense model's shapes and cost."
    ),
    "uniform": (
        "Uniform export: every block has the same widths, so stock "
        "`AutoModelForCausalLM.from_pretrained(DIR)` loads it as it is, with the speed-up."
    ),
}

SUMMARY = {
    "compact": "the pruned widths, with the speed-up (per-block widths need cfsp or remote code)",
    "padded": "stock-loadable everywhere, same outputs, no speed-up",
    "uniform": "stock-loadable with the speed-up; only when the allocation gave uniform widths",
}


def base_model(spec: str | None) -> str | None:
    if not spec:
        return None
    if spec in HUB_IDS:
        return HUB_IDS[spec]
    path_like = spec.startswith((".", "/", "~")) or Path(spec).exists()
    return spec if _HUB_ID.match(spec) and not path_like else None


def front_matter(manifest: dict) -> str:
    meta = {}
    base = base_model(manifest.get("source_model"))
    if base:
        meta["base_model"] = base
    meta.update(library_name="transformers", tags=["pruning", "cfsp", "structured-pruning"])
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _made(manifest: dict) -> list[str]:
    prune = manifest.get("prune") or {}
    config = prune.get("config") or {}
    calib = (manifest.get("calibration") or {}).get("config") or {}
    fingerprint = (manifest.get("calibration") or {}).get("fingerprint") or {}
    lines = [f"- Source model: `{manifest.get('source_model', 'unknown')}`"]
    if config:
        lines.append(
            f"- Method: `{config.get('method')}` (allocation `{config.get('allocation')}`, "
            f"criterion `{config.get('criterion')}`, reconstruction `{config.get('reconstruct')}`"
            f", structures `{config.get('structures')}`)"
        )
        lines.append(f"- Budget: {config.get('budget')} of the decoder-block weight parameters")
    choice = prune.get("control_choice")
    if isinstance(choice, dict) and "chosen" in choice:
        lines.append(
            f"- Allocation control: {choice['chosen']} (chosen from {choice.get('candidates')} "
            f"by held-out calibration loss {choice.get('heldout_loss')})"
        )
    if isinstance(prune.get("achieved_fraction"), (int, float)):
        lines.append(
            f"- Achieved removal: {100 * prune['achieved_fraction']:.2f}% of block parameters "
            f"({manifest.get('params_before', '?')} -> {manifest.get('params_after', '?')} "
            "parameters in all)"
        )
    source = calib.get("source") or fingerprint.get("source")
    if source:
        size = (
            f"{calib['nsamples']} windows x {calib['seqlen']} tokens" if calib else "see manifest"
        )
        lines.append(f"- Calibration: `{source}`, {size}")
    if manifest.get("recover"):
        lines.append(f"- Recovery: LoRA `{manifest['recover'].get('mode')}`, merged back")
    return lines


def _quality(manifest: dict) -> list[str]:
    quality = manifest.get("quality")
    if not quality:
        return [
            "Not measured when this checkpoint was written. `cfsp eval --model DIR` measures "
            "perplexity; a `cfsp run` sweep records dense and pruned perplexity in its "
            "evaluate stage's `metrics.json` and in MLflow."
        ]
    return [f"- {name}: {value}" for name, value in quality.items()]


def model_card(manifest: dict, custom_code: bool) -> str:
    kind = manifest.get("export", "compact")
    lines = [
        front_matter(manifest),
        f"# {Path(str(manifest.get('source_model', 'model'))).name}, structurally pruned by cfsp",
        "",
        f"This is the **{kind}** export of a structurally pruned causal LM: whole attention "
        "heads and FFN channels were removed from each decoder block.",
        "",
        "## How it was made",
        "",
        *_made(manifest),
        "",
        "## Measured quality",
        "",
        *_quality(manifest),
        "",
        "## How to load it",
        "",
        LOADING[kind],
    ]
    if kind == "compact" and not custom_code:
        lines += ["", "This one has uniform widths: stock `from_pretrained(DIR)` loads it."]
    lines += [
        "",
        "Other exports of the same run (`cfsp prune --export compact,padded,uniform`):",
        "",
        *[f"- {name}: {text}" for name, text in SUMMARY.items()],
        "",
        "`cfsp_manifest.json` records how the checkpoint was made and the sha256 of every file "
        "(this card included); `cfsp verify DIR` checks them.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(out: Path, manifest: dict, custom_code: bool) -> Path:
    path = Path(out) / CARD
    path.write_text(model_card(manifest, custom_code), encoding="utf-8")
    return path
