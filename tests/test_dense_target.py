"""Dense-target reconstruction (`stats: target`, cfsp.engine.dense_target): the refit, both
engines, the pipeline's pass 2, memory, and the models it refuses."""

import gc

import pytest
import torch

from cfsp.config import PruneConfig, load_params, prune_config
from cfsp.engine import dense_target
from cfsp.engine.capture import capture
from cfsp.engine.dense_target import TargetMoments, refit
from cfsp.engine.driver import prune_model
from cfsp.engine.reconstruct import liar_fold
from cfsp.engine.statistics import ChannelStats
from cfsp.engine.stream import block_forward, first_block_inputs
from cfsp.engine.streamed import PASSES_TARGET, Captured, prune_streamed
from cfsp.engine.target import Target
from cfsp.errors import UsageError
from cfsp.export import load_pruned, read_manifest
from tests.conftest import random_windows, tiny_model
from tests.test_streaming import BATCH, _assert_same, _in_memory


@pytest.fixture(autouse=True)
def _float64_math(monkeypatch):
    """The refit's algebra is checked to 1e-5: float64 math (cfsp's default is float32, whose
    agreement with float64 on real models is tests/test_devices.py's concern)."""
    monkeypatch.setenv("CFSP_MATH_DTYPE", "float64")


def test_refit_is_the_liar_fold_when_the_target_is_the_modules_own_output():
    """y* = W x + b (no upstream error): the anchored ridge refit equals LIAR's fold."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=gen, dtype=torch.float64) @ torch.randn(
        12, 12, generator=gen, dtype=torch.float64
    )
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    keep, pruned = torch.tensor([0, 2, 3, 7, 8, 11]), torch.tensor([1, 4, 5, 6, 9, 10])
    moments = TargetMoments.empty(len(keep), 5)
    moments.add(x[:, keep], x @ w.T + b)
    got_w, got_b = refit(w[:, keep], b, moments, "liar", 0.01)
    stats = ChannelStats(400, x.sum(0), x.T @ x)
    want_w, want_b = liar_fold(w, b, stats, keep, pruned, 0.01)
    # (the moments take float32 products, as the Gram does: float32 rounding)
    torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_b, want_b, atol=1e-5, rtol=1e-4)
    assert moments.residual_error(got_w, got_b) < moments.residual_error(w[:, keep], b)


def test_token_weights_act_as_repeated_tokens():
    """Moments with integer token weights equal the moments of the tokens repeated."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 6, generator=gen), torch.randn(30, 4, generator=gen)
    weight = torch.randint(1, 4, (30,), generator=gen)
    weighted, repeated = TargetMoments.empty(6, 4), TargetMoments.empty(6, 4)
    weighted.add(x, y, weight.float())
    repeated.add(x.repeat_interleave(weight, 0), y.repeat_interleave(weight, 0))
    assert weighted.count == repeated.count == int(weight.sum())
    for name in ("x_sum", "gram", "y_sum", "cross"):
        torch.testing.assert_close(
            getattr(weighted, name), getattr(repeated, name), rtol=1e-5, atol=1e-5
        )
    assert weighted.y_sq == pytest.approx(repeated.y_sq, rel=1e-9)


@torch.no_grad()
def _block_outputs(model, windows) -> list[torch.Tensor]:
    target = Target.of(model)
    hiddens, kwargs = first_block_inputs(target, windows.ids, 8)
    outs = []
    for block in target.layers:
        hiddens = [block_forward(block, h, kwargs[j]) for j, h in enumerate(hiddens)]
        outs.append(torch.cat(hiddens))
    return outs


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-gqa", "phi3-gqa"])
@pytest.mark.parametrize("structures", ["ffn", "ffn+heads"])
def test_target_lowers_the_block_output_error_vs_sequential(name, structures):
    """On the calibration windows, the last block's output is nearer the dense model's with
    stats=target than with stats=sequential; with structures=ffn block 0 (same inputs, nothing
    upstream to correct) gets the same output either way."""
    windows = random_windows(n=8, seqlen=16)
    dense = _block_outputs(tiny_model(name), windows)
    errors = {}
    for mode in ("sequential", "target"):
        model = tiny_model(name)
        cfg = PruneConfig(budget=0.5, stats=mode, structures=structures)
        prune_model(model, capture(model, windows, progress=False), cfg, windows=windows)
        outs = _block_outputs(model, windows)
        errors[mode] = [float((o - d).norm() / d.norm()) for o, d in zip(outs, dense, strict=True)]
    assert errors["target"][-1] < errors["sequential"][-1] - 1e-3
    if structures == "ffn":
        assert errors["target"][0] == pytest.approx(errors["sequential"][0], rel=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa", "phi3-gqa", "qwen3-gqa"])
@pytest.mark.parametrize(
    "options",
    [
        {"budget": 0.3},
        {"budget": 0.5, "structures": "ffn+heads"},
        {"budget": 0.5, "structures": "ffn+heads", "criterion": "obs"},
        {"budget": 0.4, "structures": "ffn+heads", "reconstruct": "bias"},
    ],
    ids=["ffn", "heads", "obs", "bias"],
)
def test_streamed_equals_in_memory(tmp_path, name, options):
    """Same kept indices, weights (float tolerance), logits and errors in both engines."""
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model(name).save_pretrained(src)
    out.mkdir()
    cfg, windows = PruneConfig(stats="target", **options), random_windows()
    model, report = _in_memory(src, windows, cfg, None)
    outcome = prune_streamed(src, windows, cfg, out, batch_size=BATCH)
    assert outcome.stream["passes"] == PASSES_TARGET
    _assert_same(model, report, outcome, out, windows)


def test_from_a_capture_the_dense_stream_is_walked_in_pass_two(tmp_path):
    """Given a plan (the pipeline's capture: no targets file), pass 2 runs each dense block on
    a dense stream of its own: the same weights as the one-shot run that read its targets."""
    src = tmp_path / "src"
    tiny_model("llama-gqa").save_pretrained(src)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg, windows = PruneConfig(budget=0.5, structures="ffn+heads", stats="target"), random_windows()
    first = prune_streamed(src, windows, cfg, tmp_path / "a", batch_size=BATCH)
    plan = Captured(_plan_of(first.report), None)
    second = prune_streamed(src, windows, cfg, tmp_path / "b", batch_size=BATCH, captured=plan)
    a, b = load_pruned(tmp_path / "a").state_dict(), load_pruned(tmp_path / "b").state_dict()
    assert set(a) == set(b)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=1e-6, rtol=1e-5)
    for got, want in zip(second.report.errors, first.report.errors, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9)


def _plan_of(report):
    from cfsp.engine.plan import PrunePlan

    return PrunePlan(keep_ratios=report.keep_ratios, blocks=report.plans)


def test_streamed_run_holds_one_modules_gram_at_a_time(tmp_path, monkeypatch):
    """No Gram is spilled in pass 1, and whenever pass 2 makes a module's statistics, no other
    width^2 statistics (another module's or another block's) are alive."""
    from cfsp.engine import streamed

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama-gqa").save_pretrained(src)
    out.mkdir()

    def no_spill(*_args, **_kwargs):
        raise AssertionError("stats=target must not spill Gram matrices")

    monkeypatch.setattr(streamed, "write_block", no_spill)
    alive: list[int] = []
    make = TargetMoments.empty.__func__

    def counted(cls, n, m):
        gc.collect()
        alive.append(sum(_is_gram(o) for o in gc.get_objects()))
        return make(cls, n, m)

    monkeypatch.setattr(TargetMoments, "empty", classmethod(counted))
    cfg = PruneConfig(budget=0.5, structures="ffn+heads", stats="target")
    prune_streamed(src, random_windows(), cfg, out, batch_size=BATCH)
    assert len(alive) == 4  # two blocks, o_proj and down_proj each
    assert max(alive) == 0


def _is_gram(obj) -> bool:
    """A width^2 statistic: TargetMoments, or ChannelStats holding a Gram matrix."""
    kind = type(obj)  # (isinstance on every object would touch deprecated torch aliases)
    if kind is TargetMoments:
        return True
    return issubclass(kind, ChannelStats) and getattr(obj, "gram", None) is not None


def test_refit_unpruned_switch(monkeypatch):
    """REFIT_UNPRUNED off: with structures=ffn o_proj is left as sliced (error rows 0, no
    bias); on: it is refit towards the dense stream."""
    windows = random_windows(n=8, seqlen=16)
    rows = {}
    for refit_all in (False, True):
        monkeypatch.setattr(dense_target, "REFIT_UNPRUNED", refit_all)
        model = tiny_model("llama-gqa")
        cfg = PruneConfig(budget=0.4, stats="target")
        report = prune_model(model, capture(model, windows, progress=False), cfg, windows=windows)
        rows[refit_all] = report.errors
        has_bias = model.model.layers[1].self_attn.o_proj.bias is not None
        assert has_bias == refit_all
    assert all(r["o_before"] == 0.0 and r["o_after"] == 0.0 for r in rows[False])
    assert rows[True][1]["o_after"] < rows[True][1]["o_before"]


def test_models_that_normalise_module_outputs_are_refused():
    """Gemma 3 puts o_proj / down_proj outputs through post-norms: additive targets do not
    hold, so stats=target stops with one UsageError before any block is changed."""
    model, windows = tiny_model("gemma3-kv1"), random_windows()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = capture(model, windows, progress=False)
    with pytest.raises(UsageError, match="added straight to the residual stream"):
        prune_model(model, stats, PruneConfig(budget=0.4, stats="target"), windows=windows)
    for key, value in model.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key]), key


def test_target_needs_the_calibration_windows():
    model = tiny_model("llama-gqa")
    stats = capture(model, random_windows(), progress=False)
    with pytest.raises(UsageError, match="dense-target statistics need the calibration windows"):
        prune_model(model, stats, PruneConfig(budget=0.4, stats="target"))


def test_stage_functions_chain_with_target_statistics(tiny_project, monkeypatch):
    """The pipeline's reconstruct stage runs stats=target from an ordinary capture."""
    from cfsp.pipeline import stages

    monkeypatch.chdir(tiny_project)
    p = load_params("params.yaml")
    cfg = prune_config(p, "cfsp+stats=target", 0.4)
    out = tiny_project / "stages"
    stages.prepare("tiny", p.prepare, out / "prepare")
    stages.capture_stage("tiny", out / "prepare", out / "capture")
    stages.allocate_stage("tiny", out / "capture", cfg, out / "allocate")
    stages.reconstruct_stage(
        "tiny", out / "allocate", out / "capture", cfg, out / "model", out / "prepare"
    )
    rebuilt = read_manifest(out / "model")
    assert rebuilt["prune"]["config"]["stats"] == "target"
    errors = rebuilt["prune"]["reconstruction_error"]
    assert all(e["down_after"] <= e["down_before"] + 1e-9 for e in errors)


def test_cli_refuses_target_on_gemma3_with_one_error_line(tmp_path, tiny_tokenizer, capsys):
    """`cfsp prune --stats target` on a Gemma 3 model: exit 2, one `error:` line, no output."""
    from cfsp.cli import main
    from tests.conftest import TEXT

    src, out = tmp_path / "gemma", tmp_path / "out"
    tiny_model("gemma3-kv1").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    (tmp_path / "text.txt").write_text(TEXT)
    args = ["prune", "--model", src, "--calib", f"file:{tmp_path / 'text.txt'}", "--nsamples", "4"]
    code = main([str(a) for a in [*args, "--seqlen", "16", "--out", out, "--stats", "target"]])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and "added straight to the residual stream" in errors[0]
    assert not out.exists()
