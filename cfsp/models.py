"""Load a causal LM and its tokenizer from one spec string.

Specs: an embedded model (`smollm2-135m`, the default, or `gemma3-270m`; see cfsp.embedded), a
local HF directory, a `.gguf` file, or a hub id (`org/name`). Weights load through safetensors
only; remote code runs only when asked. A `.gguf` file's architecture is read from its header
first, so an unsupported one fails at once rather than after a slow dequantization.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from cfsp.arch import SUPPORTED, adapter_for
from cfsp.embedded import DEFAULT_EMBEDDED, EMBEDDED, embedded_checkpoint, load_gguf
from cfsp.errors import CfspError, UsageError
from cfsp.gguf_header import read_string
from cfsp.io import check_regular_file, read_json

DEFAULT_MODEL = DEFAULT_EMBEDDED
# alias -> embedded model name, every embedded model resolved the same way
ALIASES = {alias: m.name for m in EMBEDDED.values() for alias in (m.name, *m.aliases)}
# GGUF `general.architecture` -> the model_type transformers builds from it, where they differ
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}
SINGLE_WEIGHTS = "model.safetensors"  # an unsharded checkpoint's weights
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded one's map of tensor -> shard file
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str
    path: str  # local directory or file the weights came from, or the hub id
    revision: str  # commit hash for hub models, "local" otherwise


def count_params(model) -> int:
    """Parameters of a model, a tied embedding / LM head counted once (one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# Bytes per element of every dtype name the safetensors format defines.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def check_safetensors(path: Path) -> set[str]:
    """Fail with a clear message if a safetensors file is truncated or its header is corrupt;
    return the names of the tensors it holds.

    Every tensor's dtype must be a known name and its shape x element size must equal its byte
    range; the ranges must end where the file ends. Only the header is read.
    """
    check_regular_file(path, "weights file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(handle.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [_tensor_end(k, v) for k, v in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CfspError(f"corrupt safetensors file {path}: {err}") from err
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise CfspError(f"corrupt safetensors file {path}: {size} bytes, header says {expected}")
    return {name for name in header if name != "__metadata__"}


def _tensor_end(name: str, entry: dict) -> int:
    """The end offset of one header entry, after checking its dtype, shape and byte range."""
    if not isinstance(entry, dict):
        raise ValueError(f"{name}: entry is not an object")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_natural(n) for n in shape):
        raise ValueError(f"{name}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))):
        raise ValueError(f"{name}: data_offsets {offsets!r} is not [begin, end]")
    elements = 1
    for n in shape:
        elements *= n
    if offsets[1] - offsets[0] != elements * SAFETENSORS_DTYPES[dtype]:
        raise ValueError(
            f"{name}: shape {shape} of {dtype} needs {elements * SAFETENSORS_DTYPES[dtype]} "
            f"bytes, its range {offsets} holds {offsets[1] - offsets[0]}"
        )
    return offsets[1]


def _natural(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _few(names: list[str], shown: int = 3) -> str:
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(sorted(names)[:shown]) + more


def gguf_architecture(path: Path) -> str:
    """`general.architecture` from a GGUF file's header (no tensor or vocabulary is read)."""
    try:
        arch = read_string(path, "general.architecture")
    except (ValueError, OSError) as err:
        raise UsageError(f"{path} is not a readable GGUF file: {err}") from err
    if arch is None:
        raise UsageError(f"{path} is not a readable GGUF file: no general.architecture")
    return arch


def check_gguf_architecture(path: Path) -> None:
    """Fail before dequantizing when the GGUF file holds an architecture no adapter handles."""
    arch = gguf_architecture(path)
    model_type = GGUF_MODEL_TYPES.get(arch, arch)
    if model_type not in SUPPORTED:
        raise UsageError(
            f"unsupported architecture {arch!r} in GGUF file {path}; supported: "
            f"{', '.join(SUPPORTED)} (see README, 'Adding an architecture')"
        )


def check_checkpoint_dir(path: Path) -> None:
    """A model directory cfsp may read: config.json, safetensors weights with sound headers,
    and nothing that is not a regular file where a file is expected (a FIFO blocks forever)."""
    for entry in path.iterdir():
        if not entry.is_dir():
            check_regular_file(entry)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} has no config.json: not a Hugging Face model directory")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not (path / WEIGHTS_INDEX).exists():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickle files are never loaded)" if pickled else ""
        raise UsageError(f"{path} holds no .safetensors weights{hint}")
    names = {weight_file.name: check_safetensors(weight_file) for weight_file in weights}
    if not (path / SINGLE_WEIGHTS).is_file() and (path / WEIGHTS_INDEX).exists():
        for shard, tensors in _index_shards(path).items():
            absent = sorted(tensors - names.get(shard, set()))
            if absent:
                raise CfspError(
                    f"{path / WEIGHTS_INDEX} places {_few(absent)} in {shard}, "
                    "which does not hold them"
                )


def weight_files(path: Path) -> list[Path]:
    """The safetensors files a loader reads from a model directory, chosen as transformers
    chooses them: `model.safetensors` when present, else the shards its index names, else
    every `*.safetensors` file. Sharded and single-file checkpoints load alike."""
    if (path / SINGLE_WEIGHTS).is_file():
        return [path / SINGLE_WEIGHTS]
    if (path / WEIGHTS_INDEX).exists():
        return [path / shard for shard in sorted(_index_shards(path))]
    return sorted(path.glob("*.safetensors"))


def _index_shards(path: Path) -> dict[str, set[str]]:
    """{shard file name: tensor names} from a sharded checkpoint's index, after checking that
    it maps tensor names to plain `.safetensors` file names present in the directory."""
    index_path = path / WEIGHTS_INDEX
    weight_map = read_json(index_path, expect=dict).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CfspError(f"{index_path} has no weight_map of tensor names to shard files")
    shards: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
            raise CfspError(f"{index_path}: {tensor} is placed in {shard!r}, not a file name")
        if not shard.endswith(".safetensors"):
            raise CfspError(f"{index_path}: {tensor} is placed in {shard}, not a .safetensors file")
        if not (path / shard).is_file():
            raise CfspError(f"{index_path} names the shard {shard}, which is missing or not a file")
        shards.setdefault(shard, set()).add(tensor)
    return shards


def check_loading_info(path: Path, model, info: dict) -> None:
    """Strict loading: a tensor missing from the files would be left randomly initialised, and
    an unexpected or mis-shaped one means the weights are not this config's model."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in info.get("missing_keys", []) if not (tied and k == "lm_head.weight")]
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])]
    found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
    problems = [f"{label} {_few(keys)}" for label, keys in found if keys]
    if problems:
        raise CfspError(
            f"weights in {path} do not match its config.json ({'; '.join(problems)}); "
            "refusing to fill them with random values"
        )


def _from_dir(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_checkpoint_dir(path)
    config = _read_config(path, trust_remote_code)
    adapter_for(config)  # unsupported architectures fail here, before loading weights
    if not trust_remote_code and (
        getattr(config, "cfsp_layer_widths", None) or getattr(config, "cfsp_extra_bias", None)
    ):
        from cfsp.export import load_pruned

        model = load_pruned(path, dtype=dtype)
    else:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below by name, then refused
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise CfspError(f"could not load weights from {path}: {err}") from err
        check_loading_info(path, model, info)
    try:
        # the config read above: a cfsp_<type> config.json is not one AutoConfig knows
        tokenizer = AutoTokenizer.from_pretrained(
            path, config=config, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError) as err:
        raise CfspError(f"could not load the tokenizer in {path}: {err}") from err
    return model, tokenizer


def _from_hub(model_id: str, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(
            f"cannot load {model_id!r}: not a local path, not an alias ({', '.join(ALIASES)}), "
            f"and the hub did not provide it ({str(err).splitlines()[0]})"
        ) from err
    return model, tokenizer


def check_tokenizer_matches(model, tokenizer, spec: str) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise CfspError(
            f"tokenizer of {spec} has {len(tokenizer)} tokens but the model embeds only {rows}: "
            "tokenizer and weights do not belong together"
        )


# transformers builds models inside process-global patches (meta device, skipped inits);
# two threads loading at once (a Prefect or Dask thread pool) can leave them patched for good.
_LOAD_LOCK = threading.RLock()


def load_model(
    spec: str = DEFAULT_MODEL, dtype: str = "float32", trust_remote_code: bool = False
) -> LoadedModel:
    """Resolve `spec` and return the model in eval mode on the CPU with its tokenizer."""
    with _LOAD_LOCK:
        return _load_model(spec, dtype, trust_remote_code)


def _load_model(spec: str, dtype: str, trust_remote_code: bool) -> LoadedModel:
    torch_dtype = parse_dtype(dtype)
    revision = "local"
    kind, path = _resolve_spec(spec)
    if kind == "alias":
        embedded = EMBEDDED[ALIASES[spec]]
        path = embedded_checkpoint(embedded.name)
        model, tokenizer = _from_dir(path, torch_dtype, trust_remote_code=False)
        revision = embedded.revision
    elif kind == "gguf":
        model, tokenizer = load_gguf(path)
        model = model.to(torch_dtype)
    elif kind == "dir":
        model, tokenizer = _from_dir(path, torch_dtype, trust_remote_code)
    else:
        model, tokenizer = _from_hub(spec, torch_dtype, trust_remote_code)
        revision = getattr(model.config, "_commit_hash", None) or "hub"
    adapter_for(model)
    check_tokenizer_matches(model, tokenizer, spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, spec=spec, path=str(path), revision=revision
    )


def check_model_spec(spec: str, trust_remote_code: bool = False) -> None:
    """Fail now, without loading weights, if `spec` cannot give a supported model.

    Aliases are embedded (fetched from the package index on first use). A directory needs a
    config.json of a supported architecture and intact safetensors headers; a hub id needs the
    hub. Reads headers and configs only: seconds at most, whatever the model's size.
    """
    from cfsp.data import hub_reachable

    kind, path = _resolve_spec(spec)
    if kind == "alias":
        from cfsp.home import cache_dir

        cache_dir("models")  # a CFSP_HOME that cannot hold the converted model fails now
    elif kind == "dir":
        check_checkpoint_dir(path)
        adapter_for(_read_config(path, trust_remote_code))
    elif kind == "hub" and not hub_reachable():
        raise UsageError(
            f"model {spec!r} is not a local path or an embedded alias "
            f"({', '.join(sorted(ALIASES))}), and the hub is not reachable"
        )


def local_config(spec: str):
    """The config of a model spec when it is on disk already (a directory, an embedded model
    converted before); None for a hub id, a GGUF file or an embedded model not converted yet."""
    kind, path = _resolve_spec(spec)
    if kind == "alias":
        from cfsp.home import cache_dir

        path, kind = cache_dir("models", ALIASES[spec]), "dir"
        if not (path / "config.json").is_file():
            return None
    return _read_config(path, trust_remote_code=False) if kind == "dir" else None


def _resolve_spec(spec: str) -> tuple[str, Path]:
    """Which kind of model spec this is ('alias', 'gguf', 'dir' or 'hub') and its path.

    The checks every use shares (a GGUF file exists and holds a supported architecture, a
    local path is a directory, anything else is a hub id) live here once, for loading and for
    the preflight alike.
    """
    path = Path(spec).expanduser()
    if spec in ALIASES:
        return "alias", path
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"GGUF file {spec} does not exist")
        check_gguf_architecture(path)
        return "gguf", path
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{spec} is a file; give a model directory, a .gguf file or a hub id")
        return "dir", path
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return "hub", path
    raise UsageError(
        f"model {spec!r} not found: not an existing path, not a hub id (org/name), "
        f"not an alias ({', '.join(sorted(ALIASES))})"
    )


def _read_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    if trust_remote_code:  # before transformers imports anything from the directory
        from cfsp.export import check_shipped_code

        check_shipped_code(path)
    from cfsp.export import read_config

    config = read_config(path)  # a cfsp_<type> checkpoint: the stock config, no remote code
    if config is not None:
        return config
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        if not trust_remote_code and "trust_remote_code" in str(err):
            raise UsageError(
                f"{path} ships its own modeling code (auto_map in config.json); cfsp never runs "
                "it unless you pass --trust-remote-code"
            ) from err
        raise CfspError(f"cannot read the config in {path}: {err}") from err
