"""Tiny random-init models of every supported family (2 layers, GQA on), built in-process."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prefect keeps its profile, database and persisted results here: one fresh place per session,
# removed when the session ends (it was left behind in /tmp, one folder per test run).
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cfsp-test-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The library never guesses where data lives; the tests name this team's copy when it is there
# (tests that need it skip cleanly otherwise).
if SHARED_DATA.is_dir():
    os.environ.setdefault("CFSP_DATA_DIR", str(SHARED_DATA))

TINY = {
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_attention_heads=6, num_key_value_heads=2)),
    "mistral-gqa": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-gqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
    # attention_bias on: q, k, v and o biases (real Qwen3 has none; that path is LLaMA's)
    "qwen3-gqa": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True)),
    # fused qkv_proj / gate_up_proj; its default special ids (32000) lie outside a tiny vocab
    "phi3-gqa": (
        "phi3",
        dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2),
    ),
    # one KV head (only query heads can go); a sliding and a global block with their own masks
    # and rope bases; head_dim 8 != hidden / heads
    "gemma3-kv1": (
        "gemma3_text",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
            query_pre_attn_scalar=8,
        ),
    ),
}


def tiny_model(name: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    family, heads = TINY[name]
    config = AutoConfig.for_model(
        family,
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=256,
        head_dim=8,
        tie_word_embeddings=False,
        **heads,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves attention nearly uniform; larger weights make heads differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


@pytest.fixture(params=list(TINY))
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=128,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100],
    )
    corpus = ["the cat sat on the mat and the dog ran after it"] * 50
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def random_windows(n: int = 6, seqlen: int = 16, vocab: int = 128, seed: int = 0):
    from cfsp.data import TokenWindows, tensor_hash

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seqlen), generator=gen)
    return TokenWindows(ids, {"source": "random", "hash": tensor_hash(ids)})


TEXT = "the cat sat on the mat and the dog ran after it. " * 80


@pytest.fixture
def tiny_project(tmp_path, tiny_tokenizer):
    """A directory with a tiny model `tiny/`, a text file and a full params.yaml."""
    import yaml

    from cfsp.config import Params

    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(TEXT)
    params = Params(
        models=["tiny"],
        budgets=[0.4],
        methods=["cfsp"],
        output="out",
        prepare={"source": "file:text.txt", "nsamples": 8, "seqlen": 16},
        evaluate={
            "perplexity": ["file:text.txt"],
            "seqlen": 16,
            "limit": 4,
            "speed": {"enabled": True, "seqlen": 16, "decode_tokens": 2, "warmup": 0, "repeats": 1},
        },
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    return tmp_path


def tiny_suite_argv(tmp_path, tokenizer, budgets: list[str], methods: list[str]) -> list[str]:
    """Options of a benchmark-suite run on a saved tiny model, every output under tmp_path."""
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    src = f"file:{text}"
    return [
        *("--model", str(tmp_path / "tiny"), "--calib", src, "--nsamples", "8"),
        *("--seqlen", "16", "--wikitext", src, "--wikitext-windows", "4"),
        *("--botchan", src, "--botchan-windows", "3", "--tasks", ""),
        *("--round-to", "8", "--speed-batch", "2", "--speed-repeats", "1"),
        *("--rows", str(tmp_path / "rows"), "--out", str(tmp_path / "suite.json")),
        *("--md", str(tmp_path / "BENCHMARKS.md"), "--plot", str(tmp_path / "ppl.png")),
        *("--budgets", *budgets, "--methods", *methods),
    ]


def run_cli(*args, cwd=None) -> tuple[int, str, str]:
    """`python -m cfsp.cli ARGS` of this checkout in a subprocess (PYTHONPATH made absolute, so
    the command may run in another folder): exit code, stdout, stderr."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, "-m", "cfsp.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr
