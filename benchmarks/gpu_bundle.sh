#!/usr/bin/env bash
# Prepare .gpu/ (in .gitignore) for benchmarks/gpu_check.sh on a CUDA machine that has no cfsp,
# no pydantic and no network. Run here, in the repository root, with cfsp's venv:
#
#   benchmarks/gpu_bundle.sh [PYTHON_VERSION]     # default 3.12 (the GPU image's python3)
#
# .gpu/wheels            pydantic and its pure-Python needs, for that Python (pip download)
# .gpu/home/text         the Botchan text (cfsp's cache), so botchan:train/test need no network
# .gpu/smollm2-135m.part-*  the converted SmolLM2-135M folder, weights stored in bf16 (the check
#                        compares two devices on the same weights), as a tar in 60 MiB parts
#                        (the device tool carries at most 64 MiB per call: carry one part per
#                        call to a warm machine, or copy the folder by other means and set
#                        CFSP_GPU_MODEL)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-.venv/bin/python}
mkdir -p .gpu/wheels .gpu/home/text
versions=$("$PY" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in
      ("pydantic", "pydantic_core", "annotated-types", "typing-inspection")))
PY
)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels $versions
"$PY" - <<'PY'
import shutil
from cfsp.embedded import botchan_text, embedded_checkpoint
from cfsp.home import cache_dir

botchan_text()  # cached (downloaded once where there is a network)
shutil.copy(cache_dir("text", "botchan.txt"), ".gpu/home/text/botchan.txt")
print(embedded_checkpoint("smollm2-135m"), file=open(".gpu/model-path", "w"))
PY
rm -rf .gpu/smollm2-135m .gpu/smollm2-135m.part-*
"$PY" - <<'PY'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

src, dst = Path(open(".gpu/model-path").read().strip()), Path(".gpu/smollm2-135m")
dst.mkdir()
for path in src.iterdir():
    if path.suffix == ".safetensors":  # bf16 storage halves the parts; both devices load it
        tensors = {k: v.bfloat16() for k, v in load_file(str(path)).items()}
        save_file(tensors, str(dst / path.name), metadata={"format": "pt"})
    else:
        shutil.copy(path, dst / path.name)
PY
tar -C .gpu/smollm2-135m -cf - . | split -b 60m - .gpu/smollm2-135m.part-
rm -rf .gpu/smollm2-135m
ls -la .gpu .gpu/wheels
