"""The block-streamed engine (cfsp.engine.streamed) gives what the in-memory one gives.

Each case saves a tiny random-init model, prunes it in memory (capture + prune_model) and
streamed from its directory, and compares kept indices, every weight, the config and logits.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cfsp.config import PruneConfig
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.engine.streamed import prune_streamed
from cfsp.engine.streamed_weights import CheckpointReader, load_into, release, resolve_device
from cfsp.errors import CfspError, UsageError
from cfsp.export import load_pruned, save_checkpoint, verify_checkpoint
from tests.conftest import random_windows, run_cli, tiny_model

FAMILIES = ["llama-gqa", "gemma3-kv1", "phi3-gqa", "qwen3-gqa"]  # LLaMA with GQA, 1 KV head,
# two layer types, fused projections, stock attention biases
BATCH = 4  # 6 windows: two batches, the same in both engines
# The streamed engine keeps its Gram matrices in float32 (spilled per block), the in-memory one
# in float64: the folded weights agree to float32 rounding amplified by the damped solve.
GRAM_ATOL, GRAM_RTOL = 1e-5, 1e-4


def _in_memory(src, windows, cfg, out, tokenizer=None):
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    stats = capture(model, windows, batch_size=BATCH, progress=False)
    report = prune_model(model, stats, cfg, windows=windows, batch_size=BATCH)
    if tokenizer is not None:
        save_checkpoint(model, tokenizer, out, {})
    return model, report


def _assert_same(model, report, outcome, out, windows):
    assert [p.to_dict() for p in outcome.report.plans] == [p.to_dict() for p in report.plans]
    assert outcome.report.achieved_fraction == report.achieved_fraction
    streamed = load_pruned(out)
    want, got = model.state_dict(), streamed.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(
            got[key], value, atol=GRAM_ATOL, rtol=GRAM_RTOL, msg=lambda m, k=key: f"{k}: {m}"
        )
    with torch.no_grad():
        torch.testing.assert_close(
            streamed(windows.ids).logits, model(windows.ids).logits, atol=GRAM_ATOL, rtol=GRAM_RTOL
        )
    for key in ("o_after", "down_after"):
        assert [r[key] for r in outcome.report.errors] == pytest.approx(
            [r[key] for r in report.errors], rel=GRAM_RTOL, abs=1e-9
        )


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(
    "options",
    [
        {"method": "cfsp", "budget": 0.2},
        {"method": "cfsp", "budget": 0.5, "structures": "ffn+heads"},
        {"method": "flap", "budget": 0.2},
        {"method": "flap", "budget": 0.5, "structures": "ffn+heads"},
    ],
    ids=["cfsp-0.2", "cfsp-0.5-heads", "flap-0.2", "flap-0.5-heads"],
)
def test_streamed_equals_in_memory(tmp_path, name, options):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model(name).save_pretrained(src)
    out.mkdir()
    cfg, windows = PruneConfig(**options), random_windows()
    model, report = _in_memory(src, windows, cfg, None)
    outcome = prune_streamed(src, windows, cfg, out, batch_size=BATCH)
    _assert_same(model, report, outcome, out, windows)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3-kv1"])
def test_sequential_statistics_and_sharded_input(tmp_path, name):
    """stats=sequential (the stream carries the pruned blocks' outputs), read from a sharded
    checkpoint with an index."""
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model(name).save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    out.mkdir()
    cfg = PruneConfig(budget=0.4, structures="ffn+heads", stats="sequential")
    windows = random_windows()
    model, report = _in_memory(src, windows, cfg, None)
    outcome = prune_streamed(src, windows, cfg, out, batch_size=BATCH)
    _assert_same(model, report, outcome, out, windows)


def test_tied_lm_head(tmp_path):
    """A tied LM head is stored once (as the embedding), as SmolLM2 and Gemma store it."""
    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_model("llama-gqa")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(src)
    out.mkdir()
    cfg, windows = PruneConfig(budget=0.3), random_windows()
    dense, report = _in_memory(src, windows, cfg, None)
    outcome = prune_streamed(src, windows, cfg, out, batch_size=BATCH)
    _assert_same(dense, report, outcome, out, windows)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]


def test_config_and_files_match_in_memory_checkpoint(tmp_path, tiny_tokenizer):
    """Same config.json (auto_map, per-block widths, extra biases); one shard per block plus
    one per outside module, with an index that stock from_pretrained reads."""
    src, out, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    tiny_model("phi3-gqa").save_pretrained(src)
    out.mkdir()
    ref.mkdir()
    cfg, windows = PruneConfig(budget=0.5, structures="ffn+heads"), random_windows()
    _in_memory(src, windows, cfg, ref, tiny_tokenizer)
    prune_streamed(src, windows, cfg, out, batch_size=BATCH)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (ref / "config.json").read_text()
    )
    assert (out / "modeling_cfsp.py").read_bytes() == (ref / "modeling_cfsp.py").read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 + 3  # two blocks; embed_tokens, norm, lm_head


def test_zero_compensation_bias_rewrites_shards(tmp_path):
    """A bias predicted non-zero that comes out exactly zero (o_proj all zero: W_P mu = 0) is
    dropped as settle_biases drops it: the written shards are brought to that layout."""
    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_model("llama-gqa")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    model.save_pretrained(src)
    out.mkdir()
    cfg = PruneConfig(budget=0.5, method="flap", structures="ffn+heads")
    windows = random_windows()
    dense, report = _in_memory(src, windows, cfg, None)
    assert not any("o_proj.bias" in k for k in dense.state_dict())
    outcome = prune_streamed(src, windows, cfg, out, batch_size=BATCH)
    _assert_same(dense, report, outcome, out, windows)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any("o_proj.bias" in k for k in index["weight_map"])  # the rewrite's index


def test_blocks_are_released_after_use(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama-gqa").save_pretrained(src)
    from transformers import AutoConfig

    from cfsp.engine.streamed_weights import empty_model

    skeleton = empty_model(AutoConfig.from_pretrained(src), torch.float32)
    block = skeleton.model.layers[1]
    assert all(p.is_meta for p in skeleton.parameters())
    load_into(block, "model.layers.1.", CheckpointReader(src), torch.device("cpu"), torch.float32)
    assert not any(p.is_meta for p in block.parameters())
    assert all(p.is_meta for p in skeleton.model.layers[0].parameters())
    release(block)
    assert all(p.is_meta for p in skeleton.parameters())


def test_prefetch_spans_are_the_tensors_bytes(tmp_path):
    """The byte ranges the prefetch hint names are each tensor's data in its shard, and the
    hint neither changes what is read nor fails on a file that vanished."""
    import numpy as np
    from safetensors.torch import save_file

    from cfsp.engine.streamed_weights import prefetch_file, tensor_spans

    tensors = {
        "a": torch.arange(6, dtype=torch.float32),
        "b": torch.ones(2, 3, dtype=torch.bfloat16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    spans = tensor_spans(tmp_path / "model.safetensors")
    assert set(spans) == {"a", "b"}
    offset, length = spans["a"]
    assert np.frombuffer(data[offset : offset + length], dtype=np.float32).tolist() == list(
        range(6)
    )
    assert spans["b"][1] == 6 * 2
    reader = CheckpointReader(tmp_path)
    reader.prefetch(["a", "b"])
    got = reader.read(["a", "b"], torch.device("cpu"), torch.float32)
    assert torch.equal(got["a"], tensors["a"]) and torch.equal(got["b"], tensors["b"].float())
    (tmp_path / "model.safetensors").unlink()
    reader.prefetch(["a"])  # a hint: nothing raised for a file that is gone
    prefetch_file(tmp_path / "gone.safetensors")


def test_loading_a_block_while_another_thread_builds_a_skeleton(tmp_path):
    """Two stages stream in two threads (`cfsp run`): accelerate's init_empty_weights, active
    while one builds its skeleton, must not put the other's freshly loaded weights on meta."""
    import threading

    from transformers import AutoConfig

    from cfsp.engine.streamed_weights import empty_model

    src = tmp_path / "src"
    tiny_model("llama-gqa").save_pretrained(src)
    config = AutoConfig.from_pretrained(src)
    skeleton, reader = empty_model(config, torch.float32), CheckpointReader(src)
    stop = threading.Event()

    def build_skeletons():
        while not stop.is_set():
            empty_model(config, torch.float32)

    builder = threading.Thread(target=build_skeletons)
    builder.start()
    try:
        for _ in range(200):
            block = skeleton.model.layers[0]
            load_into(block, "model.layers.0.", reader, torch.device("cpu"), torch.float32)
            assert not any(p.is_meta for p in block.parameters())
            release(block)
    finally:
        stop.set()
        builder.join()


def test_checkpoint_that_does_not_match_its_config_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama-gqa").save_pretrained(src)
    out.mkdir()
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CfspError, match="missing model.layers.1.mlp.up_proj.weight"):
        prune_streamed(src, random_windows(), PruneConfig(), out)
    assert not any(out.iterdir())


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(UsageError, match="unknown --device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_cli_stream_writes_a_verified_checkpoint(tiny_project):
    common = ("prune", "--model", "tiny", "--calib", "file:text.txt", "--nsamples", "8")
    common += ("--seqlen", "16", "--budget", "0.4")
    code, _, err = run_cli(*common, "--stream", "--device", "cpu", "--out", "s", cwd=tiny_project)
    assert code == 0, err
    code, _, err = run_cli(*common, "--out", "m", cwd=tiny_project)
    assert code == 0, err
    assert verify_checkpoint(tiny_project / "s") == []
    streamed = json.loads((tiny_project / "s" / "cfsp_manifest.json").read_text())
    memory = json.loads((tiny_project / "m" / "cfsp_manifest.json").read_text())
    # finished as save_checkpoint finishes: model card, readable modes, the same other files
    assert (tiny_project / "s" / "README.md").read_text().startswith("---")
    assert {p.stat().st_mode & 0o777 for p in (tiny_project / "s").iterdir()} == {0o644}
    files = {p.name for p in (tiny_project / "s").iterdir() if p.suffix != ".safetensors"}
    files_m = {p.name for p in (tiny_project / "m").iterdir() if p.suffix != ".safetensors"}
    assert files - {"model.safetensors.index.json"} == files_m
    assert streamed["export"] == "compact" and streamed["exports"] == {
        "compact": str(tiny_project / "s")
    }
    assert streamed["prune"]["kept"] == memory["prune"]["kept"]
    assert streamed["params_before"] == memory["params_before"]
    assert streamed["params_after"] == memory["params_after"]
    rows = streamed["stream"]["blocks"]
    assert [(r["block"], r["pass"]) for r in rows] == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert all(r["peak_rss_mib"] > 0 and r["seconds"] >= 0 for r in rows)
    a, b = load_pruned(tiny_project / "s"), load_pruned(tiny_project / "m")
    ids = random_windows().ids
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-5, rtol=1e-5)


def test_cli_stream_usage_errors(tiny_project):
    if not torch.cuda.is_available():  # the in-memory engine checks --device up front too
        code, _, err = run_cli("prune", "--model", "tiny", "--device", "cuda", cwd=tiny_project)
        assert code == 2 and "no CUDA device is available" in err and "Traceback" not in err
    code, _, err = run_cli(
        "prune", "--model", "tiny", "--stream", "--device", "gpu", cwd=tiny_project
    )
    assert code == 2 and "unknown --device" in err and "Traceback" not in err
    code, _, err = run_cli("prune", "--model", "org/name", "--stream", cwd=tiny_project)
    assert code == 2 and "--stream reads a directory of safetensors" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    code, _, err = run_cli(
        "prune", "--model", "tiny", "--stream", "--export", "compact,padded", cwd=tiny_project
    )
    assert code == 2 and "--stream writes the compact export only, not compact,padded" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not (tiny_project / "out").exists()


def test_cli_stream_shard_limit(tiny_project):
    """One shard per block / outside module: a --max-shard-size below one of them is refused
    before any pass, nothing written."""
    args = ("prune", "--model", "tiny", "--calib", "file:text.txt", "--nsamples", "4")
    args += ("--seqlen", "16", "--stream", "--max-shard-size", "10KB", "--out", "s")
    code, _, err = run_cli(*args, cwd=tiny_project)
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "--stream writes one shard per block" in err
    assert "over the max shard size of 10,000" in err
    assert not (tiny_project / "s").exists()
    assert not [p for p in tiny_project.iterdir() if p.name.startswith(".s.")]


@pytest.mark.slow
def test_smollm2_streamed_equals_in_memory(tmp_path):
    """The real model: same kept channels, same weights (float32-Gram tolerance), the same
    perplexity within 0.5%."""
    from cfsp.data import calibration_windows
    from cfsp.embedded import embedded_checkpoint
    from cfsp.evaluation.perplexity import perplexity
    from cfsp.models import load_model

    loaded = load_model("smollm2-135m")
    windows = calibration_windows("botchan:train", loaded.tokenizer, 16, 128, 0, loaded.model)
    cfg = PruneConfig(budget=0.3)
    model = loaded.model
    report = prune_model(model, capture(model, windows, progress=False), cfg, windows=windows)
    out = tmp_path / "out"
    out.mkdir()
    outcome = prune_streamed(embedded_checkpoint("smollm2-135m"), windows, cfg, out)
    assert [p.to_dict() for p in outcome.report.plans] == [p.to_dict() for p in report.plans]
    streamed = load_pruned(out)
    want, got = model.state_dict(), streamed.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-3, msg=key)
    test = calibration_windows("botchan:test", loaded.tokenizer, 8, 128, 1, model)
    ppl = perplexity(streamed, test, progress=False)["ppl"]
    assert ppl == pytest.approx(perplexity(model, test, progress=False)["ppl"], rel=5e-3)
