"""Save and load pruned checkpoints: safetensors weights, config, tokenizer, manifest.

Uniform widths (and LLaMA biases through its config flags) load with stock
`AutoModelForCausalLM.from_pretrained(DIR)`. Per-block widths record `cfsp_layer_widths` in
config.json and ship `modeling_cfsp.py` with an `auto_map`: `cfsp.load_pruned(DIR)` loads them
without remote code; stock loading needs `trust_remote_code=True`, which is never the default.

The manifest records the sha256 of every file the checkpoint holds (`files_sha256`: weights,
config, generation config, tokenizer files, shipped code), not only the weights: a swapped
tokenizer or modeling file changes what the checkpoint does as much as a changed weight.
`weights_sha256` is still written (and read, for checkpoints of older releases).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cfsp.errors import CfspError, UsageError
from cfsp.io import read_json, sha256_file, write_json

MANIFEST = "cfsp_manifest.json"
MODELING_FILE = Path(__file__).with_name("modeling_cfsp.py")
# Terms of use that travel with a model and every checkpoint derived from it (Gemma's terms
# ask that derivatives carry them): copied from the manifest's source_path when present.
TERMS_PATTERNS = ("*TERMS*", "LICENSE*", "NOTICE*", "USE_POLICY*")
# Files a loader may read (weights, configs, tokenizers, code): never unrecorded in a checkpoint.
LOADABLE = (".safetensors", ".json", ".py", ".model", ".txt", ".tiktoken", ".jinja", ".bin")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def weight_hashes(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.glob("*.safetensors"))}


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file in a checkpoint directory except the manifest itself."""
    return {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def _save_files(model, tokenizer, out: Path) -> None:
    """save_pretrained, with safetensors' I/O failures (a full disk) raised as the OSError they
    are, so `atomic_dir` reports them as one line instead of a SafetensorError traceback."""
    from safetensors import SafetensorError

    try:
        model.save_pretrained(out, safe_serialization=True)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(out)) from err
    tokenizer.save_pretrained(out)


def save_checkpoint(model, tokenizer, out: Path, manifest: dict) -> None:
    """Write into `out` (a fresh temporary directory from `atomic_dir`)."""
    from cfsp.faults import signal_point

    config = model.config
    if getattr(config, "cfsp_layer_widths", None) or getattr(config, "cfsp_extra_bias", None):
        arch = type(model).__name__
        config.auto_map = {"AutoModelForCausalLM": f"modeling_cfsp.Cfsp{arch}"}
        shutil.copy(MODELING_FILE, out / "modeling_cfsp.py")
    _save_files(model, tokenizer, out)
    copy_terms(manifest.get("source_path"), out)
    signal_point("export")  # tests only: a signal while the checkpoint is half-written
    manifest = dict(manifest, weights_sha256=weight_hashes(out), files_sha256=file_hashes(out))
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


def recorded_hashes(directory: str | Path, manifest: dict | None = None) -> tuple[dict, bool]:
    """{file name: sha256} the manifest records, and whether it covers every file (False for
    manifests of older releases, which record weights only)."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    complete = "files_sha256" in manifest
    recorded = manifest.get("files_sha256" if complete else "weights_sha256")
    if recorded is None:
        recorded = {}
    if not isinstance(recorded, dict):
        key = "files_sha256" if complete else "weights_sha256"
        raise CfspError(
            f"{directory / MANIFEST}: {key} must map file names to sha256 digests "
            f"(found {type(recorded).__name__})"
        )
    return recorded, complete


def _entry_problem(directory: Path, name: object, digest: object) -> str | None:
    """Why a manifest entry cannot be checked as written, if it cannot: only plain file names
    inside the checkpoint, each with a 64-digit hex digest, are ever opened."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        return f"{name!r}: not a file name inside the checkpoint"
    if not isinstance(digest, str) or not _SHA256.match(digest):
        return f"{name}: recorded digest {digest!r} is not a sha256"
    path = directory / name
    if path.is_symlink():
        return f"{name}: is a symbolic link (to {os.readlink(path)}); a checkpoint holds its files"
    if not path.exists():
        return f"{name}: recorded in the manifest but missing"
    if not path.is_file():
        return f"{name}: is not a regular file"
    return None


def _hash_problem(path: Path, digest: str) -> str | None:
    try:
        actual = sha256_file(path)
    except OSError as err:
        return f"{path.name}: cannot be read ({err.strerror or err})"
    if actual != digest:
        return f"{path.name}: sha256 {actual[:12]}... != recorded {digest[:12]}..."
    return None


def _unrecorded(directory: Path, recorded: dict, complete: bool) -> list[str]:
    """Files a loader could pick up that the manifest does not vouch for."""
    problems = []
    for path in sorted(directory.iterdir()):
        if path.name == MANIFEST or path.name in recorded:
            continue
        loadable = path.name.endswith(LOADABLE if complete else (".safetensors",))
        if path.is_symlink() and (complete or loadable):
            problems.append(f"{path.name}: is a symbolic link, not recorded in the manifest")
        elif loadable:
            problems.append(f"{path.name}: not recorded in the manifest")
    return problems


def _check_once(directory: Path) -> list[str]:
    manifest = read_manifest(directory)
    recorded, complete = recorded_hashes(directory, manifest)
    problems = []
    if not any(str(name).endswith(".safetensors") for name in recorded):
        problems.append("the manifest lists no weight files (*.safetensors)")
    for name, digest in recorded.items():
        problem = _entry_problem(directory, name, digest)
        if problem is None:
            problem = _hash_problem(directory / name, digest)
        if problem is not None:
            problems.append(problem)
    old = manifest.get("weights_sha256")
    if complete and old is not None and not isinstance(old, dict):
        problems.append(f"weights_sha256 in {MANIFEST} is not a mapping of file names to hashes")
    if complete and isinstance(old, dict):
        problems += [
            f"{name}: weights_sha256 and files_sha256 disagree"
            for name, digest in old.items()
            if recorded.get(name) != digest
        ]
    return problems + _unrecorded(directory, recorded, complete)


def verify_checkpoint(directory: str | Path, attempts: int = 5) -> list[str]:
    """Compare every file with the sha256 its manifest records; return the problems.

    A checkpoint replaced while it is read (a concurrent `--overwrite`, a rerun of a stage) is
    read again: the directory's identity is compared before and after, so a mix of two
    versions is never reported as a verdict on either.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} is not a checkpoint directory")
    error: Exception | None = None
    missing = 0  # attempts that found no directory at all
    for _ in range(attempts):
        before = _identity(directory)
        missing += before is None
        try:
            problems = _check_once(directory)
        except (CfspError, OSError) as err:
            error = err
            if before is not None and _identity(directory) == before:
                break  # a directory that stands still: the error is real
        else:
            if before is not None and _identity(directory) == before:
                return problems
        time.sleep(0.05)  # between the two renames of a replacement, the name is missing
    else:
        if missing < attempts:
            error = None  # it was there, and changed under every read
    if isinstance(error, OSError):
        raise CfspError(f"cannot read {directory}: {error}") from error
    if error is not None:
        raise error
    raise CfspError(f"{directory} kept changing while it was verified; try again")


def _identity(directory: Path) -> tuple[int, int, int] | None:
    """Which directory `directory` names now: a rename or a changed entry changes its ctime."""
    try:
        st = directory.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def check_shipped_code(directory: str | Path) -> None:
    """Before `trust_remote_code` runs anything from a cfsp checkpoint: its config.json and
    every .py file must match the manifest, so replaced or added code never runs.

    Directories without a cfsp manifest are not cfsp checkpoints; they are the user's to trust.
    """
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        return
    recorded, complete = recorded_hashes(directory)
    code = sorted(p.name for p in directory.iterdir() if p.suffix == ".py")
    problems = []
    for name in ["config.json", *code]:
        if not complete:
            problems.append(f"{name}: no sha256 recorded (manifest of an older cfsp)")
            continue
        problem = _entry_problem(directory, name, recorded.get(name, ""))
        if name not in recorded:
            problem = f"{name}: not recorded in the manifest"
        if problem is None:
            problem = _hash_problem(directory / name, recorded[name])
        if problem is not None:
            problems.append(problem)
    if problems:
        raise CfspError(
            f"refusing to run the code shipped in {directory} (--trust-remote-code): it does not "
            f"match the manifest: {'; '.join(problems)}. cfsp loads its own checkpoints without "
            "remote code: drop --trust-remote-code"
        )
