"""benchmarks/scale.py: the shard-by-shard writer of random-init checkpoints and the harness
that measures `cfsp prune` on them (tiny shape, tiny tokenizer, a few windows)."""

from __future__ import annotations

import json

import torch

from benchmarks import scale
from cfsp.models import check_checkpoint_dir, load_model


def test_writer_gives_a_loadable_sharded_checkpoint_with_finite_logits(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "tiny"
    scale.main(["write", "--shape", "tiny", "--out", str(out), "--tokenizer", str(tmp_path / "tok"),
                "--max-shard-size", "100KB"])  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == sorted(p.name for p in out.glob("*.safetensors")) and len(shards) == 4
    check_checkpoint_dir(out)  # every tensor in the shard the index names; headers sound
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(tiny_tokenizer) and config["num_hidden_layers"] == 2
    loaded = load_model(str(out), dtype="bfloat16")
    params = dict(loaded.model.named_parameters())
    assert index["metadata"]["total_size"] == 2 * sum(p.numel() for p in params.values())
    norm = params["model.layers.0.input_layernorm.weight"]
    assert norm.dtype == torch.bfloat16 and bool((norm == 1).all())
    assert abs(params["model.layers.1.mlp.up_proj.weight"].float().std().item() - 0.02) < 2e-3
    assert scale.finite_forward(out)


class _Vocab:
    """Just what llama_config reads from a tokenizer: its size and special ids."""

    bos_token_id, eos_token_id = 1, 2

    def __len__(self):
        return 49152


def test_public_shape_is_planned_in_whole_blocks_without_memory():
    config = scale.llama_config(scale.SHAPES["tinyllama-1.1b"], _Vocab())
    specs = scale.tensor_specs(config)  # meta device: nothing allocated
    block = 2 * 2048 * 2048 + 2 * 256 * 2048 + 3 * 5632 * 2048 + 2 * 2048
    expected = 22 * block + 2 * 49152 * 2048 + 2048  # untied embeddings, final norm
    assert sum(torch.Size(s).numel() for _, s in specs) == expected
    shards = scale.plan_shards(specs, 500_000_000)
    where: dict[int, set[int]] = {}
    for k, shard in enumerate(shards):
        for name, _ in shard:
            where.setdefault(scale._group(name), set()).add(k)
        blocks = {scale._group(name) for name, _ in shard}
        if len(blocks) > 1:  # a shard of several units stays under the limit
            assert sum(2 * torch.Size(s).numel() for _, s in shard) <= 500_000_000
    assert all(len(shard_ids) == 1 for shard_ids in where.values())  # no block split
    assert len(where) == 22 + 2


def test_measure_records_a_row_table_and_plot(tmp_path, tiny_tokenizer):
    from benchmarks.scale_measure import save_row
    from tests.conftest import TEXT

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "text.txt").write_text(TEXT)
    results, md, plot = tmp_path / "scale.json", tmp_path / "scale.md", tmp_path / "scale.png"
    args = ["measure", "--shape", "tiny", "--work", str(tmp_path / "work"), "--nsamples", "4"]
    args += ["--seqlen", "16", "--calib", f"file:{tmp_path / 'text.txt'}", "--threads", "1"]
    args += ["--tokenizer", str(tmp_path / "tok"), "--results", str(results), "--md", str(md)]
    scale.main([*args, "--plot", str(plot)])
    (row,) = json.loads(results.read_text())["rows"]
    assert row["shape"] == "tiny" and row["threads"] == 1 and row["nsamples"] == 4
    assert row["prune_wall_s"] > 0 and row["dense_forward_s"] > 0
    assert row["time_ratio"] == round(row["prune_wall_s"] / row["dense_forward_s"], 2)
    assert row["peak_rss_bytes"] > 50e6 and row["maxrss_bytes"] > 50e6  # a Python with torch
    # On the CPU; the tiny run's spill lives for well under the 2 s between scratch-folder polls.
    assert row["peak_device_bytes"] is None and row["stats_bytes"] == 0
    assert row["engine"] == "streamed"  # cfsp prune's engine for a directory, from its manifest
    assert len(row["dense_forward_runs_s"]) == 3  # short forwards: the median of three
    assert len(row["prune_runs_s"]) == 3  # short prunes too
    assert row["prune_wall_s"] == sorted(row["prune_runs_s"])[1]
    assert row["dense_finite"] and row["output_finite"]
    assert 0.2 < row["achieved_fraction"] < 0.4
    table = md.read_text()
    assert "| streamed | tiny |" in table and "(median of 3)" in table
    assert plot.stat().st_size > 1000
    assert not (tmp_path / "work/tiny-pruned").exists()  # output removed unless --keep-output
    save_row(results, dict(row, prune_wall_s=1.0))  # the same settings: the row is replaced
    save_row(results, dict(row, nsamples=8))  # other settings: a row of their own
    rows = json.loads(results.read_text())["rows"]
    assert [(r["nsamples"], r["prune_wall_s"]) for r in rows] == [
        (4, 1.0),
        (8, row["prune_wall_s"]),
    ]
