"""Save and load pruned checkpoints: safetensors weights, config, tokenizer, model card,
manifest. Three export kinds (`EXPORT_KINDS`):

* compact: the pruned widths. Uniform widths (and biases the stock config flags express) load
  with stock `AutoModelForCausalLM.from_pretrained(DIR)`. Per-block widths (`cfsp_layer_widths`)
  or a bias stock code cannot build (`cfsp_extra_bias`) ship `modeling_cfsp.py` and say
  `model_type: cfsp_<stock type>` with an `auto_map`: a stock load without remote code stops
  with transformers' "custom code ... trust_remote_code=True" message; `cfsp.load_pruned(DIR)`
  loads them without remote code.
* padded: zero-padded back to the config's uniform widths (cfsp.export_padded): same outputs,
  stock code only, no speed-up.
* uniform: the compact export, refused unless it is already stock-loadable (a uniform
  allocation, and biases the stock config can express).

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
import stat
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cfsp.errors import CfspError, UsageError
from cfsp.io import (
    as_os_error,
    parse_shard_size,
    publish_modes,
    read_json,
    sha256_file,
    write_json,
)

MANIFEST = "cfsp_manifest.json"
EXPORT_KINDS = ("compact", "padded", "uniform")
MODELING_FILE = Path(__file__).with_name("modeling_cfsp.py")
# Terms of use that travel with a model and every checkpoint derived from it (Gemma's terms
# ask that derivatives carry them): copied from the manifest's source_path when present.
TERMS_PATTERNS = ("*TERMS*", "LICENSE*", "NOTICE*", "USE_POLICY*")
# Files a loader may read (weights, configs, tokenizers, code): never unrecorded in a checkpoint.
LOADABLE = (".safetensors", ".json", ".py", ".model", ".txt", ".tiktoken", ".jinja", ".bin")
# The pipeline's record of how a stage folder was made (cfsp.pipeline.store): written after the
# checkpoint, read by no loader, so not a file the manifest has to vouch for.
STAGE_RECORD = "cfsp_stage.json"
# Weight files are split above this size; the embedded models (<= 1.1 GB in float32) stay whole.
MAX_SHARD_SIZE = "2GB"
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


def _save_files(model, tokenizer, out: Path, max_shard_size: str | int) -> None:
    """save_pretrained, with safetensors' I/O failures (a full disk) raised as the OSError they
    are, so `atomic_dir` reports them as one line instead of a SafetensorError traceback."""
    from safetensors import SafetensorError

    try:
        model.save_pretrained(
            out, safe_serialization=True, max_shard_size=parse_shard_size(max_shard_size)
        )
    except SafetensorError as err:
        os_error = as_os_error(err, out)
        if os_error is None:
            raise
        raise os_error from err
    tokenizer.save_pretrained(out)


def needs_custom_code(config) -> bool:
    """Whether stock modeling code cannot build this config's model as it is."""
    return bool(
        getattr(config, "cfsp_layer_widths", None) or getattr(config, "cfsp_extra_bias", None)
    )


def parse_exports(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """`compact`, `padded,compact` or a list -> the kinds in order, each once; else UsageError."""
    items = value.split(",") if isinstance(value, str) else list(value)
    kinds = [str(k).strip() for k in items]
    unknown = [k for k in kinds if k not in EXPORT_KINDS]
    if not kinds or unknown:
        what = f"kind {', '.join(map(repr, unknown))}" if unknown else "list is empty"
        raise UsageError(
            f"export {what}: choose from {', '.join(EXPORT_KINDS)} (or a comma-separated list, "
            "e.g. compact,padded)"
        )
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise UsageError(f"export {', '.join(repeated)} listed twice")
    return kinds


def export_dirs(out: Path, kinds: list[str]) -> dict[str, Path]:
    """Where each kind goes: the first to `out`, each other one beside it (`OUT-padded`)."""
    out = Path(out)
    return {k: out if i == 0 else out.with_name(f"{out.name}-{k}") for i, k in enumerate(kinds)}


def check_exports(config, prune, kinds: list[str]) -> None:
    """Refuse, before any work, exports this model and pruning config can never produce: a
    uniform export of a non-uniform allocation, or a stock-loadable export (padded, uniform) of
    a family with no stock flag for the compensation bias the reconstruction will add."""
    from cfsp.arch import adapter_for

    if "uniform" in kinds and prune.allocation != "uniform":
        raise UsageError(
            f"export uniform needs allocation=uniform (method {prune.method} allocates "
            f"{prune.allocation}: per-block widths); export padded instead (stock-loadable, same "
            "outputs, no speed-up) or choose a uniform method (wanda_sp, magnitude, random)"
        )
    stock = [k for k in kinds if k in ("padded", "uniform")]
    if not stock or prune.reconstruct == "none" or prune.budget == 0:
        return
    from cfsp.export_llama import llama_form_problem

    adapter = adapter_for(config)
    flags = [("down_proj", adapter.mlp_bias_attr)]
    if prune.structures == "ffn+heads":
        flags.append(("o_proj", adapter.o_bias_attr))
    missing = [name for name, flag in flags if flag is None]
    why = llama_form_problem(config) if missing else None
    if why:
        raise UsageError(
            f"export {stock[0]}: {config.model_type} has no config flag for a bias on "
            f"{' or '.join(missing)}, where reconstruct={prune.reconstruct} puts one, and {why}; "
            "stock code cannot compute that model. Use --reconstruct none, or export compact "
            "(loads with cfsp.export.load_pruned or from_pretrained(DIR, trust_remote_code=True))"
        )


def write_exports(checkpoint: Path, kinds: list[str], dtype: str = "float32", **facts) -> dict:
    """Write the kinds other than compact beside an existing compact `checkpoint` (as
    `CHECKPOINT-padded`, ...), with `facts` (measured quality) added to their manifests and
    model cards. Returns {kind: path}; compact is the checkpoint itself."""
    from transformers import AutoTokenizer

    from cfsp.io import atomic_dir
    from cfsp.models import DTYPES

    checkpoint = Path(checkpoint)
    paths = {"compact": str(checkpoint)} if "compact" in kinds else {}
    extra = [k for k in kinds if k != "compact"]
    if not extra:
        return paths
    model = load_pruned(checkpoint, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, config=model.config)
    drop = ("weights_sha256", "files_sha256", "export")
    manifest = {k: v for k, v in read_manifest(checkpoint).items() if k not in drop}
    manifest.update(facts)
    for kind, dest in export_dirs(checkpoint, ["compact", *extra]).items():
        if kind == "compact":
            continue
        with atomic_dir(dest) as tmp:
            save_checkpoint(model, tokenizer, tmp, manifest, kind)
        paths[kind] = str(dest)
    return paths


def export_model(model, manifest: dict, kind: str):
    """The model to write for `kind` (padded: a padded copy); refuses what `kind` cannot hold."""
    if kind == "padded":
        from cfsp.export_padded import padded_copy

        kept = (manifest.get("prune") or {}).get("kept")
        if not isinstance(kept, list):
            raise CfspError("padded export: the manifest records no kept indices (prune.kept)")
        return padded_copy(model, kept)
    if kind == "uniform" and needs_custom_code(model.config):
        problem = uniform_problem(model)
        if problem is None:  # uniform widths, biases only the LLaMA form holds
            from cfsp.arch import adapter_for
            from cfsp.export_llama import as_llama

            return as_llama(model, adapter_for(model))
        raise CfspError(f"uniform export: {problem}")
    return model


def uniform_problem(model) -> str | None:
    """Why a uniform export of `model` cannot be written (None: it can, in the LLaMA form)."""
    if getattr(model.config, "cfsp_layer_widths", None):
        return (
            "the allocation gave the blocks different widths, which stock code cannot build; "
            "prune with allocation=uniform, or export padded (same outputs, no speed-up)"
        )
    from cfsp.export_padded import stock_bias_problem

    return stock_bias_problem(model)


def save_checkpoint(
    model,
    tokenizer,
    out: Path,
    manifest: dict,
    kind: str = "compact",
    max_shard_size: str | int = MAX_SHARD_SIZE,
) -> None:
    """Write the `kind` export into `out` (a fresh temporary directory from `atomic_dir`);
    weights larger than `max_shard_size` are split into `model-0000k-of-0000n.safetensors`
    shards plus an index."""
    model = export_model(model, manifest, kind)
    config = model.config
    custom = needs_custom_code(config)
    if custom:
        shutil.copy(MODELING_FILE, out / "modeling_cfsp.py")
    with _auto_map(config, type(model).__name__ if custom else None):
        _save_files(model, tokenizer, out, max_shard_size)
    if custom:
        _mark_custom(out / "config.json")
    finish_checkpoint(out, manifest, kind, custom)


def write_config(model, out: Path) -> bool:
    """config.json alone, as `save_checkpoint` writes it (for a writer of its own weights, the
    block-streamed engine): with modeling_cfsp.py, the auto_map and a `cfsp_` model_type where
    stock code cannot build the model. Returns whether it needs that shipped code."""
    custom = needs_custom_code(model.config)
    if custom:
        shutil.copy(MODELING_FILE, out / "modeling_cfsp.py")
    with _auto_map(model.config, type(model).__name__ if custom else None):
        model.config.save_pretrained(out)
    if custom:
        _mark_custom(out / "config.json")
    return custom


def finish_checkpoint(out: Path, manifest: dict, kind: str, custom: bool) -> None:
    """After the weights, config and tokenizer: the source's terms, the model card, readable
    file modes, then the manifest with every file's sha256."""
    from cfsp.faults import signal_point
    from cfsp.model_card import write_model_card

    copy_terms(manifest.get("source_path"), out)
    manifest = dict(manifest, export=kind)
    write_model_card(out, manifest, custom)
    signal_point("export")  # tests only: a signal while the checkpoint is half-written
    publish_modes(out)  # before hashing: the manifest records what readers get
    manifest = dict(manifest, weights_sha256=weight_hashes(out), files_sha256=file_hashes(out))
    write_json(out / MANIFEST, manifest)


@contextlib.contextmanager
def _auto_map(config, arch: str | None):
    """While saving: the auto_map of the shipped classes (arch given), or none of cfsp's (a
    padded copy of a model that was saved compact before); the caller's config is restored."""
    before = getattr(config, "auto_map", None)
    if arch:
        config.auto_map = {
            "AutoConfig": f"modeling_cfsp.Cfsp{type(config).__name__}",
            "AutoModelForCausalLM": f"modeling_cfsp.Cfsp{arch}",
        }
    elif before and "modeling_cfsp" in str(before):
        del config.auto_map
    try:
        yield
    finally:
        if before is None and hasattr(config, "auto_map"):
            del config.auto_map
        elif before is not None:
            config.auto_map = before


def _mark_custom(config_path: Path) -> None:
    """Give a config stock code cannot build its own model_type (`cfsp_llama`, ...)."""
    from cfsp.modeling_cfsp import CFSP_PREFIX

    raw = read_json(config_path, expect=dict)
    raw["model_type"] = CFSP_PREFIX + raw["model_type"]
    write_json(config_path, raw)


def read_config(directory: Path):
    """A checkpoint's config as the stock class, without remote code: a `cfsp_<type>`
    config.json is read as `<type>` (its auto_map dropped). None for any other model_type."""
    from transformers import CONFIG_MAPPING

    from cfsp.modeling_cfsp import CFSP_PREFIX

    raw = read_json(Path(directory) / "config.json", expect=dict)
    model_type = raw.get("model_type")
    if not (isinstance(model_type, str) and model_type.startswith(CFSP_PREFIX)):
        return None
    base = model_type[len(CFSP_PREFIX) :]
    if base not in CONFIG_MAPPING:
        raise CfspError(f"{directory}/config.json: unknown model_type {model_type!r}")
    values = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
    try:
        return CONFIG_MAPPING[base].from_dict(values)
    except (TypeError, ValueError, KeyError) as err:
        raise CfspError(f"cannot read the config in {directory}: {err}") from err


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
    from cfsp.models import check_checkpoint_dir, weight_files

    directory = Path(directory)
    check_checkpoint_dir(directory)  # regular files, sound headers: before anything is read
    config = read_config(directory) or AutoConfig.from_pretrained(directory)
    if hasattr(config, "auto_map"):
        del config.auto_map  # build with the stock class; resizing is done here, not remotely
    model = _empty_model(config)
    state = {}
    for path in weight_files(directory):  # one file, or the shards the index names
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
        if path.name in (MANIFEST, STAGE_RECORD) or path.name in recorded:
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
    if _names_a_non_directory(directory):
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


def _names_a_non_directory(path: Path) -> bool:
    """Whether `path` exists and is not a directory, from ONE stat: `exists()` then `is_dir()`
    could see a checkpoint that is being replaced (two renames) and then its missing name."""
    try:
        return not stat.S_ISDIR(path.stat().st_mode)
    except OSError:  # missing (or unreadable): the verify loop reports it
        return False


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
