"""`control: auto` (cfsp.engine.choose): held-out windows, the losses it compares, the plan
it keeps, and the same choice from both engines."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from cfsp.config import PruneConfig
from cfsp.data import TokenWindows, calibration_windows, tensor_hash
from cfsp.engine.capture import capture
from cfsp.engine.choose import CONTROLS, chooses, fixed
from cfsp.engine.driver import plan_pruning, prune_model
from cfsp.engine.streamed import prune_streamed
from cfsp.errors import UsageError
from tests.conftest import random_windows, tiny_model

BATCH = 4


def _windows_with_heldout(n: int = 6, held: int = 5, seqlen: int = 16) -> TokenWindows:
    windows = random_windows(n, seqlen)
    windows.heldout = random_windows(held, seqlen, seed=1).ids
    return windows


def _loss(model, ids: torch.Tensor) -> float:
    """Mean next-token loss of `model` over `ids`, from its own forward."""
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))


def test_heldout_windows_are_beside_the_calibration_windows(tmp_path, tiny_tokenizer):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97} the cat {i}" for i in range(3000)))
    plain = calibration_windows(f"file:{text}", tiny_tokenizer, 6, 16, seed=3)
    both = calibration_windows(f"file:{text}", tiny_tokenizer, 6, 16, seed=3, heldout=5)
    assert torch.equal(both.ids, plain.ids)  # drawing held-out windows changes no calibration one
    assert plain.heldout is None and both.heldout.shape == (5, 16)
    assert both.fingerprint["heldout_hash"] == tensor_hash(both.heldout)
    calib = {tuple(w.tolist()) for w in both.ids}
    assert not calib & {tuple(w.tolist()) for w in both.heldout}


def test_too_short_a_text_for_heldout_windows_is_a_clear_error(tmp_path, tiny_tokenizer):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 20)
    with pytest.raises(UsageError, match="too short for 50 held-out windows"):
        calibration_windows(f"file:{text}", tiny_tokenizer, 4, 16, seed=0, heldout=50)


def test_choice_only_where_it_applies():
    held = torch.zeros(2, 8, dtype=torch.long)
    cfg = PruneConfig(budget=0.3)
    assert cfg.control == "auto" and chooses(cfg, held)
    assert not chooses(cfg, None) and not chooses(cfg, held[:0])
    assert not chooses(fixed(cfg, 0.5), held)
    assert not chooses(PruneConfig(budget=0.3, allocation="uniform"), held)
    assert not chooses(PruneConfig(budget=0.3, stats="sequential"), held)
    assert not chooses(PruneConfig(budget=0.0), held)


def test_zero_control_is_the_uniform_allocation():
    model = tiny_model("llama-gqa")
    stats = capture(model, random_windows(), batch_size=BATCH, progress=False)
    flat = plan_pruning(model, stats, PruneConfig(budget=0.4, control=0.0))
    uniform = plan_pruning(model, stats, PruneConfig(budget=0.4, allocation="uniform"))
    assert [p.to_dict() for p in flat.blocks] == [p.to_dict() for p in uniform.blocks]


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3-kv1"])
def test_losses_are_those_of_the_pruned_models_and_the_lowest_is_kept(name):
    dense = tiny_model(name)
    windows = _windows_with_heldout()
    stats = capture(dense, windows, batch_size=BATCH, progress=False)
    cfg = PruneConfig(budget=0.5)
    chosen = copy.deepcopy(dense)
    report = prune_model(chosen, stats, cfg, windows=windows, batch_size=BATCH)
    record = report.to_dict()["control_choice"]
    assert record["candidates"] == list(CONTROLS)
    assert record["heldout_tokens"] == windows.heldout[:, 1:].numel()
    for control, loss in zip(CONTROLS, record["heldout_loss"], strict=True):
        model = copy.deepcopy(dense)
        prune_model(model, stats, fixed(cfg, control), windows=windows, batch_size=BATCH)
        assert loss == pytest.approx(_loss(model, windows.heldout), abs=1e-4)
    best = CONTROLS[min(range(len(CONTROLS)), key=lambda c: record["heldout_loss"][c])]
    assert record["chosen"] == best
    want = plan_pruning(dense, stats, fixed(cfg, best))
    assert [p.to_dict() for p in report.plans] == [p.to_dict() for p in want.blocks]
    assert report.config["control"] == "auto"  # the request as given; the choice beside it


def test_no_heldout_windows_means_the_default_control():
    dense = tiny_model("llama-gqa")
    windows = random_windows()
    stats = capture(dense, windows, batch_size=BATCH, progress=False)
    report = prune_model(copy.deepcopy(dense), stats, PruneConfig(budget=0.5), windows=windows)
    assert "control_choice" not in report.to_dict()
    want = plan_pruning(dense, stats, PruneConfig(budget=0.5, control=0.5))
    assert [p.to_dict() for p in report.plans] == [p.to_dict() for p in want.blocks]


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3-kv1"])
def test_streamed_engine_makes_the_same_choice(tmp_path, name):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model(name).save_pretrained(src)
    out.mkdir()
    windows, cfg = _windows_with_heldout(), PruneConfig(budget=0.5)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    stats = capture(model, windows, batch_size=BATCH, progress=False)
    report = prune_model(model, stats, cfg, windows=windows, batch_size=BATCH)
    outcome = prune_streamed(src, windows, cfg, out, batch_size=BATCH)
    streamed, memory = outcome.report.to_dict(), report.to_dict()
    assert streamed["control_choice"]["chosen"] == memory["control_choice"]["chosen"]
    assert streamed["control_choice"]["heldout_loss"] == pytest.approx(
        memory["control_choice"]["heldout_loss"], abs=1e-4
    )
    assert streamed["kept"] == memory["kept"]


def test_model_card_says_which_control_was_chosen():
    from cfsp.model_card import model_card

    choice = {"candidates": [0.5, 0.0], "heldout_loss": [4.1, 4.0], "chosen": 0.0}
    manifest = {"prune": {"config": {"method": "cfsp", "budget": 0.5}, "control_choice": choice}}
    card = model_card(manifest, custom_code=False)
    assert "Allocation control: 0.0 (chosen from [0.5, 0.0] by held-out" in card


def test_allocate_stage_chooses_on_the_prepared_heldout_windows(tiny_project, monkeypatch):
    """The pipeline's stages make the choice the streamed engine makes: prepare keeps held-out
    windows beside the calibration ones, allocate compares the candidates on them."""
    from cfsp.config import load_params, prune_config
    from cfsp.io import read_json
    from cfsp.pipeline import stages

    monkeypatch.chdir(tiny_project)
    p = load_params("params.yaml")
    cfg = prune_config(p, "cfsp", 0.4)
    out = tiny_project / "stages"
    stages.prepare("tiny", p.prepare, out / "prepare")
    tokens = stages._load_tokens(out / "prepare")
    assert tokens.heldout.shape[0] == p.prepare.heldout
    stages.capture_stage("tiny", out / "prepare", out / "capture")
    stages.allocate_stage("tiny", out / "capture", cfg, out / "allocate", tokens=out / "prepare")
    allocation = read_json(out / "allocate" / stages.ALLOCATION)
    choice = allocation["control_choice"]
    assert choice["candidates"] == list(CONTROLS) and choice["chosen"] in CONTROLS
    best = min(range(len(CONTROLS)), key=lambda c: choice["heldout_loss"][c])
    assert choice["chosen"] == CONTROLS[best]
    # pass 2 records the choice its allocation was made with, in the manifest and the card
    stages.reconstruct_stage("tiny", out / "allocate", out / "capture", cfg, out / "reconstruct")
    manifest = read_json(out / "reconstruct" / "cfsp_manifest.json")
    assert manifest["prune"]["control_choice"] == choice
    card = (out / "reconstruct" / "README.md").read_text()
    assert f"Allocation control: {choice['chosen']} (chosen from" in card
