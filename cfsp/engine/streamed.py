"""Block-streamed pruning: memory bounded by one block, weights read block by block.

The default engine of `cfsp prune` and `cfsp.prune(spec)`. The in-memory engine
(cfsp.engine.capture + driver) holds the whole model and every block's float64 Gram matrices
at once. This engine holds the model's skeleton on the meta device, one
block's weights (on --device), one block's calibration activations [N, L, d], and at most one
block's width^2 statistics. It reuses the same criteria, allocation, selection and LIAR
reconstruction functions, so it keeps the same channels and writes the same weights (up to
its float32 Grams' rounding).

Passes (cost in F = one dense forward over the calibration tokens, LM head excluded):
  pass 1  stream the dense blocks once: angular distance per block, the O(width) moments
          (count, sum, sum of squares) of the o_proj / down_proj inputs that every fine
          criterion reads, the block's fine scores while its weights are loaded, and its Gram
          matrices (one bfloat16 GEMM per module for a bfloat16 model, else float32 per
          batch; o_proj's only when heads may be pruned), written to a file of its own
          (cfsp.engine.streamed_spill) and freed.       cost ~1 F + Gram (T w^2) + write
  plan    coarse allocation (angular distances or FLAP's global threshold) and kept indices,
          from O(width) scores per block (driver.plan_from_scores, as plan_pruning).  ~0
  choose  with `control: auto` (cfsp.engine.choose, `choose_streamed`): each block's weights
          and Gram file read again, one pruned copy per candidate plan run over the held-out
          windows, then the final norm and LM head.   cost ~0.12 F per candidate at 16 of 128
          windows + one fold per candidate and block + the reads
  pass 2  per block: reload it, read its Gram file back (math dtype), fold (LIAR / bias) and
          slice with the existing functions, write the block's shard, release it.
                                                           cost: read + solves (w^3), no forward
So ~1 F + one Gram per module + the solves, as the in-memory engine; the spill costs disk (at
the Llama-2-7B shape ~0.5 GB per block, fp32) and its I/O. With stats=sequential the Grams must
be taken on the pruned model's activations: pass 1 keeps the moments only and pass 2 runs each
block's inputs through the pruned blocks (each block unpruned for its Grams, then pruned to
move on: ~(3 - p) F + Grams; 3.47 F measured on SmolLM2 at p = 0.5, README).
With stats=target (cfsp.engine.dense_target) pass 1 keeps the moments and writes each block's
dense residual stream (after attention, after the block: 2 T d floats) to its own file instead
of the Grams; pass 2 reads one block's file back and runs ~2.5 forwards of the pruned block.
From a capture made earlier (the pipeline's, which holds Grams, not targets) pass 2 runs each
dense block on a dense stream of its own before pruning it instead (+1 F, no disk).
Nothing of size width^2 outlives a block; what crosses blocks is O(width) (scores, kept
indices, biases flags) or on disk, read back one block at a time. The pipeline's stages are
these passes run separately (cfsp.pipeline.stages: capture, allocate, prune / reconstruct).

Output (cfsp.engine.streamed_layout): one safetensors shard per block and one per module
outside the blocks (embeddings, final norm, LM head), the index and the config; the entry point
(cfsp.pruning_streamed) adds generation config, tokenizer, model card and manifest. The pruned
layout (compensation biases as driver.settle_biases leaves them) is decided before the first
block is written. (cfsp.engine.stream is the activation walk both engines use; this module
streams the weights.)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cfsp.config import PruneConfig
from cfsp.devices import bound_host_heap, factories_on, trim_host_heap
from cfsp.engine.capture import peak_rss_mib
from cfsp.engine.choose import candidate_plans, chooses, head_loss, heldout_losses, pick
from cfsp.engine.dense_target import DenseRecorder, dense_targets, refit_block, target_stats
from cfsp.engine.driver import (
    PruneReport,
    _zero_bias,
    choose_on_stream,
    plan_from_scores,
    prune_block,
    prune_report,
)
from cfsp.engine.importance import fine_scores
from cfsp.engine.plan import BlockPlan, PrunePlan
from cfsp.engine.statistics import BlockStats
from cfsp.engine.stream import block_forward, first_block_inputs, run_block
from cfsp.engine.streamed_layout import (
    ROLES,
    check_shard_limit,
    conform,
    final_layout,
    nonzero_biases,
    outside_groups,
    predicted_biases,
    rewrite_blocks,
    write_outside,
)
from cfsp.engine.streamed_spill import (
    GramMoments,
    block_file,
    read_block,
    read_targets,
    write_block,
    write_targets,
)
from cfsp.engine.streamed_stats import ChannelMoments, Meter, block_moments
from cfsp.engine.streamed_weights import (
    CheckpointReader,
    ShardWriter,
    buffers_to,
    checkpoint_names,
    empty_model,
    load_into,
    module_names,
    prefetch_file,
    release,
)
from cfsp.engine.target import Target
from cfsp.errors import CfspError, UsageError
from cfsp.export import write_config
from cfsp.faults import kill_point
from cfsp.models import _LOAD_LOCK

log = logging.getLogger(__name__)
PASSES_DENSE = "pass 1: forward, moments + Grams spilled per block; plan; pass 2: read, fold, write"
PASSES_SEQUENTIAL = "pass 1: forward, moments; plan; pass 2: forward on pruned inputs, Grams, fold"
PASSES_TARGET = (
    "pass 1: forward, moments + dense residual stream per block; plan; "
    "pass 2: forwards on pruned inputs, refit towards the dense stream"
)


@dataclass
class Stream:
    """What both passes share: the skeleton, where its tensors are, and how to run it."""

    target: Target  # the skeleton (parameters on meta), its adapter and blocks
    reader: CheckpointReader
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    meter: Meter
    tensors: dict[str, tuple[int, ...]]  # what the checkpoint holds (expected_tensors)
    rows: list[dict] = field(default_factory=list)

    @property
    def model(self) -> torch.nn.Module:
        return self.target.model

    @property
    def adapter(self):
        return self.target.adapter

    def layers(self) -> list[torch.nn.Module]:
        return self.target.layers

    def prefix(self, module) -> str:
        return module_names(self.model)[id(module)] + "."

    def load(self, module) -> None:
        load_into(module, self.prefix(module), self.reader, self.device, self.dtype)

    def prefetch(self, index: int) -> None:
        """Start reading block `index`'s weights from disk while the current block computes
        (a hint to the kernel, see CheckpointReader.prefetch); nothing past the last block."""
        layers = self.layers()
        if index < len(layers):
            block = layers[index]
            self.reader.prefetch(checkpoint_names(block, self.prefix(block)))


def open_stream(directory: Path, config, dtype, device, batch_size: int) -> Stream:
    """The skeleton of the model in `directory`, checked against its checkpoint's tensors."""
    model = empty_model(config, dtype)
    buffers_to(model, device)
    reader = CheckpointReader(directory)
    check_tensors(model, reader, directory)
    tensors = expected_tensors(model)
    return Stream(Target.of(model), reader, device, dtype, batch_size, Meter(device), tensors)


def expected_tensors(model) -> dict[str, tuple[int, ...]]:
    """Names and shapes a checkpoint of `model` holds (a tied LM head is stored once)."""
    unique = dict(model.named_parameters())
    every = dict(model.named_parameters(remove_duplicate=False))
    return {
        k: tuple(v.shape) for k, v in model.state_dict().items() if k not in every or k in unique
    }


def check_tensors(model, reader: CheckpointReader, directory: Path) -> None:
    """Refuse a checkpoint whose tensor names or shapes are not the config's model's."""
    want, have = expected_tensors(model), reader.shapes()
    every = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(want) - set(have))
    unexpected = sorted(k for k in set(have) - set(want) if k not in every)
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    problems = [
        f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        )
        if keys
    ]
    if problems:
        raise CfspError(
            f"weights in {directory} do not match its config.json ({'; '.join(problems)})"
        )


def first_inputs(stream: Stream, ids: torch.Tensor):
    """What enters block 0 (and the blocks' keyword arguments), from the model's own code.

    Only the embedding is loaded; blocks the forward passes before the last one whose inputs
    are caught (models with several layer types) are stood in for by identities: their outputs
    are never used, only the masks / rotary tables handed to later blocks are.
    """
    embed = stream.adapter.embed(stream.model)
    stream.load(embed)
    layers = list(stream.layers())
    try:
        for block in layers:
            block.forward = _passthrough
        return first_block_inputs(stream.target, ids, stream.batch_size)
    finally:
        for block in layers:
            del block.forward
        release(embed)
        stream.model.tie_weights()  # loading the embedding replaced the tied parameter


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@torch.no_grad()
def _bar(blocks, desc: str):
    """A per-block progress bar, drawn only when stderr is a terminal (disable=None)."""
    from tqdm.auto import tqdm

    blocks = list(blocks)
    return tqdm(blocks, desc=desc, total=len(blocks), disable=None, unit="block")


def pass_one(
    stream: Stream,
    ids: torch.Tensor,
    spill: Path | None,
    score=None,
    targets=None,
    o_gram: bool = True,
    digests: bool = True,
):
    """Run every dense block once: its angular distance and O(width) moments; with `spill`,
    also its Gram matrices (o_proj's only with `o_gram`: none is needed when no head can be
    pruned), written to `spill` (one file per block) as soon as the block is done; with
    `targets` (a folder), its dense residual stream after attention and after the block
    (stats=target). `score(index, parts, stats)` runs while the block's weights are loaded
    (fine scores). Returns (per-block moments as BlockStats, the block files' sha256 (None
    each without `digests`), the scores)."""
    hiddens, kwargs_list = first_inputs(stream, ids)
    empty = GramMoments.empty if spill is not None else ChannelMoments.empty
    empty_o = empty if o_gram else ChannelMoments.empty
    blocks, hashes, scores = [], [], []
    for index, block in enumerate(_bar(stream.layers(), "pass 1")):
        t0 = time.perf_counter()
        stream.load(block)
        stream.prefetch(index + 1)
        parts = stream.adapter.parts(block)
        if targets is None:
            stats = block_moments(block, parts, hiddens, kwargs_list, stream.device, empty, empty_o)
        else:
            stats = _moments_and_targets(
                stream, block, parts, (hiddens, kwargs_list), targets, index
            )
        if score is not None:
            scores.append(score(index, parts, stats))
        release(block)
        if spill is not None:
            hashes.append(write_block(spill, index, stats, digests))
            stats = BlockStats(stats.angular, stats.tokens, stats.o.moments(), stats.down.moments())
        blocks.append(stats)
        trim_host_heap()
        kill_point("CFSP_FAULT_KILL_AFTER_BLOCK", index)  # tests only: a crash mid-capture
        row = {"block": index, "pass": 1, **stream.meter.snapshot(t0)}
        stream.rows.append(row)
        log.info(
            "stream pass 1 block %2d: angular %.4f  %s", index, stats.angular, Meter.describe(row)
        )
    return blocks, hashes, scores


def _moments_and_targets(stream: Stream, block, parts, walk, folder: Path, index: int):
    """block_moments (O(width) moments) of the dense block, plus its dense targets h_mid /
    h_out written to `folder` (stats=target)."""
    hiddens, kwargs_list = walk
    recorder, inputs = DenseRecorder(parts), list(hiddens)
    try:
        stats = block_moments(block, parts, hiddens, kwargs_list, stream.device)
    finally:
        recorder.close()
    write_targets(folder, index, *recorder.targets(inputs, hiddens))
    return stats


def scorer(stream: Stream, cfg: PruneConfig):
    """`score` for pass_one: the block's (head, channel) fine scores by cfg.criterion, on the
    CPU (O(width) kept)."""
    head_dim = stream.target.geometry.head_dim

    def score(index: int, parts, stats):
        heads, channels = fine_scores(
            cfg.criterion, parts, stats, head_dim, cfg.exponent, cfg.seed, index
        )
        return heads.cpu(), channels.cpu()

    return score


@torch.no_grad()
def score_blocks(stream: Stream, moments: list[BlockStats], cfg: PruneConfig) -> list[tuple]:
    """Fine scores of every block from captured O(width) moments, loading only each block's
    weights in turn (no forward): the allocation of a capture made earlier."""
    if len(moments) != len(stream.layers()):
        raise UsageError(
            f"statistics cover {len(moments)} blocks, the model has {len(stream.layers())}"
        )
    score, scores = scorer(stream, cfg), []
    for index, block in enumerate(stream.layers()):
        stream.load(block)
        stream.prefetch(index + 1)
        with factories_on(stream.device):
            scores.append(score(index, stream.adapter.parts(block), moments[index]))
        release(block)
    return scores


def sequential_stats(cfg: PruneConfig) -> bool:
    """Whether pass 2 retakes the statistics on the pruned blocks' outputs (a forward)."""
    return cfg.stats == "sequential" and cfg.reconstruct != "none"


def prune_one(
    stream: Stream, block, plan: BlockPlan, cfg: PruneConfig, stats, hiddens, kwargs, goals=None
):
    """Fold and slice of one loaded block (driver.prune_model's loop body), from its captured
    statistics `stats`, or with stats=sequential from its inputs `hiddens` (the pruned
    blocks' outputs), which then move on through the pruned block; with stats=target, refit
    towards `goals` (the dense ([h_mid], [h_out]) of the block)."""
    adapter = stream.adapter
    head_dim = stream.target.geometry.head_dim
    if cfg.reconstruct != "none":
        parts = adapter.parts(block)
        _zero_bias(parts.o)
        _zero_bias(parts.down)
    if goals is not None:
        choose_on_stream(adapter, block, plan, cfg, head_dim, hiddens, kwargs)
        return refit_block(adapter, block, plan, cfg, head_dim, (hiddens, kwargs), *goals)
    if stats is None:
        stats = run_block(block, adapter.parts(block), hiddens, kwargs, advance=False)
    row = prune_block(adapter, block, plan, stats, cfg, head_dim)
    del stats  # this block's Gram matrices
    if hiddens is not None:
        for j, h in enumerate(hiddens):
            hiddens[j] = block_forward(block, h, kwargs[j])
    return row


@dataclass
class Spill:
    """Where pass 2 reads each block's Gram matrices (and their recorded sha256, if checked)."""

    folder: Path
    digests: list[str | None]


@torch.no_grad()
def pass_two(stream: Stream, ids, cfg: PruneConfig, plans, layout, writer, first: int, spill):
    """Per block: load, read its statistics (or retake them: stats=sequential), prune +
    reconstruct, write its shard, release. stats=target reads the block's dense targets from
    `spill`, or with `spill` None (a capture made without them: the pipeline's) runs the dense
    block on a dense stream of its own first (+1 F, no disk)."""
    adapter, config = stream.adapter, stream.model.config
    stock = {role: adapter.has_bias(config, role) for role in ROLES}
    sequential, dense_target = sequential_stats(cfg), target_stats(cfg)
    walks = sequential or dense_target
    hiddens, kwargs_list = first_inputs(stream, ids) if walks else (None, None)
    dense_walk = list(hiddens) if dense_target and spill is None else None
    errors, nonzero = [], {role: False for role in ROLES}
    for index, (block, plan) in enumerate(_bar(zip(stream.layers(), plans, strict=True), "pass 2")):
        t0 = time.perf_counter()
        prefix = stream.prefix(block)
        stream.load(block)
        stream.prefetch(index + 1)
        if not walks and index + 1 < len(plans):  # the Gram file read below, one block ahead
            prefetch_file(block_file(spill.folder, index + 1))
        stats = goals = None
        if dense_walk is not None:  # no targets file: the dense block runs here first
            goals = dense_targets(block, stream.adapter.parts(block), dense_walk, kwargs_list)
        elif dense_target:
            goals = read_targets(spill.folder, index, hiddens, stream.device)
        elif not sequential:
            stats = read_block(spill.folder, index, spill.digests[index], stream.device)
        # factories inside cfsp's functions on the device; the lock: slicing creates modules
        # and parameters, which must not meet another thread's skeleton build (empty_model)
        with _LOAD_LOCK, factories_on(stream.device):
            row = prune_one(stream, block, plan, cfg, stats, hiddens, kwargs_list, goals)
        del goals
        row = {"block": index, **row}
        for role, value in nonzero_biases(adapter, block, stock, cfg).items():
            nonzero[role] |= value
        writer.write(first + index, conform(block.state_dict(), layout[index], prefix))
        release(block)
        trim_host_heap()
        errors.append(row)
        meter = {"block": index, "pass": 2, **stream.meter.snapshot(t0)}
        stream.rows.append(meter)
        w = plan.widths()
        log.info(
            "stream pass 2 block %2d: heads %d kv %d ffn %d  rel.err o %.4f->%.4f down "
            "%.4f->%.4f  %s",
            index, w.num_heads, w.num_kv_heads, w.intermediate, row["o_before"],
            row["o_after"], row["down_before"], row["down_after"], Meter.describe(meter),
        )  # fmt: skip
    return errors, nonzero


@dataclass
class StreamOutcome:
    """What a streamed prune did: the report (as prune_model's), the pruned model's skeleton
    (meta; its config is the one written), whether it needs shipped code, and the per-block
    time and memory rows."""

    report: PruneReport
    shadow: torch.nn.Module
    custom_code: bool  # the checkpoint ships modeling_cfsp.py (cfsp.export.write_config)
    stream: dict


def prune_streamed(
    directory: str | Path,
    windows,
    cfg: PruneConfig,
    out: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    config=None,
    shard_limit: int | None = None,
    captured: Captured | None = None,
) -> StreamOutcome:
    """Prune the checkpoint in `directory` block by block; write shards, index and config into
    the existing folder `out`. Memory: one block's weights, activations and statistics.

    `config`: the checkpoint's (read from `directory` when None). `shard_limit`: bytes no
    shard may exceed (one shard per block / outside module), checked before any pass.
    `captured`: a capture made earlier and its plan (the pipeline's stages): pass 1 is skipped.
    Otherwise pass 1 spills the Gram matrices to a temporary folder (TMPDIR), removed after."""
    from transformers import AutoConfig

    directory, out, device = Path(directory), Path(out), torch.device(device)
    bound_host_heap()
    config = config if config is not None else AutoConfig.from_pretrained(directory)
    stream = open_stream(directory, config, dtype, device, batch_size)
    groups = outside_groups(stream)
    if shard_limit is not None:
        check_shard_limit(stream, groups, shard_limit)
    ids, geo = windows.ids if windows is not None else None, stream.target.geometry
    with tempfile.TemporaryDirectory(prefix="cfsp-stats-") as scratch:
        t0 = time.perf_counter()
        if captured is None:
            grams = not (sequential_stats(cfg) or target_stats(cfg))
            targets = Path(scratch) if target_stats(cfg) else None
            blocks, _, scores = pass_one(
                stream,
                ids,
                Path(scratch) if grams else None,
                scorer(stream, cfg),
                targets,
                o_gram=cfg.structures != "ffn",  # o_proj keeps every input: no fold, no Gram
                digests=False,  # our own files, read back in this process: not hashed
            )
            angular = torch.tensor([b.angular for b in blocks], dtype=torch.float64)
            spill = Spill(Path(scratch), [None] * len(blocks))
            heldout = windows.heldout if windows is not None else None
            choice = None
            if grams and chooses(cfg, heldout):
                allocation, choice = choose_streamed(stream, angular, scores, cfg, heldout, spill)
            else:
                allocation = plan_from_scores(geo, angular, scores, cfg)
        else:
            allocation, spill, choice = captured.plan, captured.spill, captured.choice
        t1 = time.perf_counter()
        dense = copy.deepcopy(stream.model)  # meta: pass 2 slices the skeleton's blocks
        predicted = predicted_biases(dense, allocation.blocks, cfg)
        layout, shadow = final_layout(dense, allocation.blocks, cfg, predicted)
        writer = ShardWriter(out, len(groups) + len(layout))
        write_outside(stream, groups, writer)
        t2 = time.perf_counter()
        errors, nonzero = pass_two(
            stream, ids, cfg, allocation.blocks, layout, writer, len(groups), spill
        )
    if nonzero != predicted:
        log.info(
            "compensation biases %s, not %s as predicted: rewriting shards", nonzero, predicted
        )
        layout, shadow = final_layout(dense, allocation.blocks, cfg, nonzero)
        rewrite_blocks(stream, out, writer, layout, len(groups))
    writer.finish()
    custom = write_config(shadow, out)
    t3 = time.perf_counter()
    timings = {"pass1": t1 - t0, "plan_and_outside": t2 - t1, "pass2_and_write": t3 - t2}
    report = prune_report(geo, allocation, cfg, errors, timings)
    report.choice = choice or {}
    return StreamOutcome(report, shadow, custom, _summary(stream, timings, cfg))


@dataclass
class Captured:
    """A capture made earlier (cfsp.engine.streamed_spill's folder) and the plan chosen from
    it: what the pipeline's prune / reconstruct stages hand prune_streamed."""

    plan: PrunePlan
    spill: Spill | None  # None with stats=sequential / target (pass 2 retakes them)
    choice: dict = field(default_factory=dict)  # control: auto's record (Choice.to_dict)


@torch.no_grad()
def choose_streamed(
    stream: Stream, angular: torch.Tensor, scores: list[tuple], cfg: PruneConfig, heldout, spill
) -> tuple[PrunePlan, dict]:
    """`control: auto` between pass 1 and pass 2 (cfsp.engine.choose): each dense block is
    loaded again with its Gram file, and the candidates' pruned copies of it run over the
    held-out windows; then the final norm and LM head score them. +1 weight and Gram read,
    one fold per candidate and block, the held-out forwards."""
    geo = stream.target.geometry
    plans = candidate_plans(geo, angular, scores, cfg)
    inputs = first_inputs(stream, heldout)
    loss = head_loss(stream.model, stream.adapter, heldout, stream.batch_size)
    walk = _dense_blocks(stream, spill)
    losses, tokens = heldout_losses(
        stream.adapter, geo.head_dim, plans, walk, inputs, loss, cfg, lambda: _head(stream)
    )
    plan, choice = pick(plans, losses, tokens)
    return plan, choice.to_dict()


def _dense_blocks(stream: Stream, spill: Spill):
    """(index, dense block loaded, its statistics read back) for every block, in turn."""
    for index, block in enumerate(_bar(stream.layers(), "choose")):
        stream.load(block)
        stream.prefetch(index + 1)
        stats = read_block(spill.folder, index, spill.digests[index], stream.device)
        with _LOAD_LOCK, factories_on(stream.device):
            yield index, block, stats
        del stats
        release(block)
        trim_host_heap()


@contextlib.contextmanager
def _head(stream: Stream):
    """The final norm and the LM head loaded (a tied head: the embedding it shares)."""
    model = stream.model
    head = model.get_output_embeddings()
    tied = f"{stream.prefix(head)}weight" not in stream.tensors
    modules = [stream.adapter.decoder(model).norm, stream.adapter.embed(model) if tied else head]
    for module in modules:
        stream.load(module)
    model.tie_weights()
    try:
        yield
    finally:
        for module in modules:
            release(module)
        model.tie_weights()


def _passes(cfg: PruneConfig) -> str:
    if target_stats(cfg):
        return PASSES_TARGET
    return PASSES_SEQUENTIAL if sequential_stats(cfg) else PASSES_DENSE


def _summary(stream: Stream, timings: dict, cfg: PruneConfig) -> dict:
    """Per-block time and peak memory rows, and the totals, for the manifest."""
    summary = {
        "device": str(stream.device),
        "passes": _passes(cfg),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "blocks": stream.rows,
    }
    device = stream.meter.peak_device_mib()
    if device is not None:
        summary["peak_device_mib"] = device
    return summary
