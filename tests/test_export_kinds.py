"""Export kinds: what a stock `from_pretrained(DIR)` does with each, and what cfsp writes."""

import json
import stat

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from cfsp.cli import main
from cfsp.config import Params, PruneConfig
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.errors import CfspError, UsageError
from cfsp.export import (
    check_exports,
    load_pruned,
    parse_exports,
    save_checkpoint,
    verify_checkpoint,
)
from tests.conftest import TEXT, TINY, random_windows, tiny_model

PER_BLOCK = dict(budget=0.4, method="cfsp", temperature=0.2, structures="ffn+heads")


def _prune(name, cfg):
    model = tiny_model(name)
    windows = random_windows()
    report = prune_model(model, capture(model, windows, progress=False), cfg)
    return model, windows, {"prune": report.to_dict(), "source_model": "tiny"}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _save(model, tokenizer, manifest, folder, kind):
    folder.mkdir()
    save_checkpoint(model, tokenizer, folder, manifest, kind)
    return folder


def _published(folder):
    """0644 files, a model card with its front matter, every file recorded in the manifest."""
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and {"pruning", "cfsp"} <= set(meta["tags"])
    assert "## How to load it" in card and "## Measured quality" in card
    assert verify_checkpoint(folder) == []
    return card


@pytest.mark.parametrize("name", list(TINY))
def test_stock_load_of_each_kind(tmp_path, tiny_tokenizer, name):
    """Per-block widths: the compact export refuses a stock load with a message naming
    trust_remote_code (not a size mismatch); the padded one loads with stock code and gives
    the compact model's logits; uniform is refused (the allocation is not uniform)."""
    model, windows, manifest = _prune(name, PruneConfig(reconstruct="none", **PER_BLOCK))
    compact = _save(model, tiny_tokenizer, manifest, tmp_path / "compact", "compact")
    padded = _save(model, tiny_tokenizer, manifest, tmp_path / "padded", "padded")
    ref = _logits(load_pruned(compact), windows.ids)
    torch.testing.assert_close(ref, _logits(model, windows.ids))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(compact)
    assert json.loads((compact / "config.json").read_text())["model_type"].startswith("cfsp_")
    stock = AutoModelForCausalLM.from_pretrained(padded).eval()
    torch.testing.assert_close(_logits(stock, windows.ids), ref, atol=1e-5, rtol=1e-5)
    config = json.loads((padded / "config.json").read_text())
    assert not any(k.startswith("cfsp_") or k == "auto_map" for k in config)
    assert not (padded / "modeling_cfsp.py").exists()
    remote = AutoModelForCausalLM.from_pretrained(compact, trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(remote, windows.ids), ref)
    assert "cfsp.load_pruned" in _published(compact)
    assert "gives up the speed-up" in _published(padded)
    with pytest.raises(CfspError, match="uniform export: the allocation gave the blocks"):
        _save(model, tiny_tokenizer, manifest, tmp_path / "uniform", "uniform")


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-gqa", "mistral-gqa", "qwen2-gqa"])
def test_padded_keeps_compensation_biases_through_stock_flags(tmp_path, tiny_tokenizer, name):
    """LIAR biases on o_proj / down_proj: LLaMA's attention_bias / mlp_bias (Qwen3: o_proj via
    attention_bias) carry them; the other modules the flags build hold zeros."""
    cfg = PruneConfig(**PER_BLOCK)
    model, windows, manifest = _prune(name, cfg)
    if name.startswith("qwen3"):  # no FFN bias flag: refused before the work, and at export
        with pytest.raises(UsageError, match="no config flag for a bias on down_proj"):
            check_exports(tiny_model(name).config, cfg, ["padded"])
        with pytest.raises(CfspError, match="no config flag that builds a bias on down_proj"):
            _save(model, tiny_tokenizer, manifest, tmp_path / "padded", "padded")
        return
    assert model.config.cfsp_extra_bias == ["o_proj", "down_proj"]
    check_exports(tiny_model(name).config, cfg, ["padded"])  # not refused
    padded = _save(model, tiny_tokenizer, manifest, tmp_path / "padded", "padded")
    config = json.loads((padded / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"]
    assert config["model_type"] == "llama"  # Mistral / Qwen2: their exact LLaMA form
    stock = AutoModelForCausalLM.from_pretrained(padded).eval()
    torch.testing.assert_close(
        _logits(stock, windows.ids), _logits(model, windows.ids), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        _logits(stock, windows.ids),
        _logits(
            load_pruned(_save(model, tiny_tokenizer, manifest, tmp_path / "c", "compact")),
            windows.ids,
        ),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("name", ["mistral-gqa", "qwen2-gqa"])
def test_sliding_window_has_no_llama_form(tmp_path, tiny_tokenizer, name):
    """A real sliding window cannot be LLaMA: refused before the work (naming the compact
    export and trust_remote_code), and at export."""
    cfg = PruneConfig(**PER_BLOCK)
    model = tiny_model(name)
    if name.startswith("mistral"):
        model.config.sliding_window = 8
    else:
        model.config.use_sliding_window = True
    with pytest.raises(UsageError, match="sliding.*trust_remote_code=True"):
        check_exports(model.config, cfg, ["padded"])
    pruned, _, manifest = _prune(name, cfg)
    pruned.config.sliding_window = 8
    if name.startswith("qwen2"):
        pruned.config.use_sliding_window = True
        pruned.config.layer_types = ["sliding_attention"] * len(pruned.config.layer_types)
    with pytest.raises(CfspError, match="sliding.*compact export"):
        _save(pruned, tiny_tokenizer, manifest, tmp_path / "padded", "padded")
    assert not list((tmp_path / "padded").iterdir())


def test_uniform_mistral_with_biases_is_a_llama_checkpoint(tmp_path, tiny_tokenizer):
    cfg = PruneConfig(budget=0.4, method="wanda_sp", reconstruct="liar", structures="ffn+heads")
    model, windows, manifest = _prune("mistral-gqa", cfg)
    assert model.config.cfsp_extra_bias
    check_exports(tiny_model("mistral-gqa").config, cfg, ["uniform"])
    folder = _save(model, tiny_tokenizer, manifest, tmp_path / "uniform", "uniform")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(
        _logits(stock, windows.ids), _logits(model, windows.ids), atol=1e-5, rtol=1e-5
    )


def test_padded_export_needs_the_kept_indices(tmp_path, tiny_tokenizer):
    model, _, _ = _prune("llama-gqa", PruneConfig(reconstruct="none", **PER_BLOCK))
    with pytest.raises(CfspError, match="records no kept indices"):
        _save(model, tiny_tokenizer, {"source_model": "tiny"}, tmp_path / "padded", "padded")


def test_uniform_export_loads_with_stock_code(tmp_path, tiny_tokenizer):
    cfg = PruneConfig(budget=0.4, method="wanda_sp", reconstruct="liar", structures="ffn+heads")
    model, windows, manifest = _prune("llama-gqa", cfg)
    check_exports(model.config, cfg, ["uniform"])
    folder = _save(model, tiny_tokenizer, manifest, tmp_path / "uniform", "uniform")
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(
        _logits(stock, windows.ids), _logits(load_pruned(folder), windows.ids)
    )
    assert "Uniform export" in _published(folder)


def test_export_requests_that_can_never_work_are_usage_errors():
    with pytest.raises(UsageError, match="choose from compact, padded, uniform"):
        parse_exports("compact,fast")
    with pytest.raises(UsageError, match="padded listed twice"):
        parse_exports("padded,padded")
    with pytest.raises(UsageError, match="export list is empty"):
        parse_exports([])
    assert parse_exports("padded, compact") == ["padded", "compact"]
    with pytest.raises(UsageError, match="export uniform needs allocation=uniform"):
        check_exports(tiny_model("llama-gqa").config, PruneConfig(method="cfsp"), ["uniform"])
    with pytest.raises(ValueError, match="uniform needs allocation=uniform"):
        Params(methods=["cfsp"], export={"kinds": ["compact", "uniform"]})
    assert Params(methods=["wanda_sp"], export={"kinds": ["uniform"]}).export.kinds == ["uniform"]


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prune_writes_each_export(tmp_path, tiny_tokenizer, capsys):
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "ckpt"
    common = [
        *("prune", "--model", tmp_path / "tiny", "--calib", f"file:{tmp_path / 'text.txt'}"),
        *("--nsamples", "8", "--seqlen", "16", "--budget", "0.3", "--out", out),
        *("--control", "0.5"),  # per-block widths: auto may choose the uniform plan here
    ]
    code, stdout, err = _cli(capsys, *common, "--export", "compact,fast")
    assert code == 2 and "error: export kind 'fast': choose from" in err and not out.exists()
    code, stdout, err = _cli(capsys, *common, "--export", "compact,padded")
    assert code == 0, err
    padded = tmp_path / "ckpt-padded"
    assert f"padded export: {padded}" in stdout and f"compact export: {out}" in stdout
    for folder, kind in ((out, "compact"), (padded, "padded")):
        manifest = json.loads((folder / "cfsp_manifest.json").read_text())
        assert manifest["export"] == kind and manifest["exports"]["padded"] == str(padded)
        _published(folder)
    code, stdout, err = _cli(capsys, "verify", padded)
    assert code == 0, err
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    stock = AutoModelForCausalLM.from_pretrained(padded).eval()
    torch.testing.assert_close(_logits(stock, ids), _logits(load_pruned(out), ids))


@pytest.mark.slow
def test_real_padded_export_evaluates_with_stock_lm_eval(tmp_path, monkeypatch):
    """SmolLM2-135M at p=0.3: the padded export, loaded by lm-eval's own `hf` model from its
    path with no trust_remote_code, scores a local task exactly as the compact one does."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from cfsp.config import CalibConfig
    from cfsp.evaluation.zeroshot import export_tasks, zeroshot
    from cfsp.models import load_model
    from cfsp.pruning import prune_to_checkpoint as compress

    try:
        tasks = export_tasks(tmp_path / "tasks", tasks=["piqa"])
    except UsageError as err:
        pytest.skip(f"no local zero-shot data: {err}")
    out = tmp_path / "pruned"
    compress(
        "smollm2-135m",
        CalibConfig(nsamples=8, seqlen=64),
        PruneConfig(budget=0.3),
        out,
        export="compact,padded",
    )
    padded = tmp_path / "pruned-padded"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # stock lm-eval, no hub
        monkeypatch.setenv(name, "1")
    stock = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={padded},dtype=float32",
        tasks=["cfsp_piqa"],
        device="cpu",
        limit=16,
        bootstrap_iters=0,
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
    )
    compact = load_model(str(out))
    ours = zeroshot(compact.model, compact.tokenizer, ["piqa"], limit=16, per_item=True)
    stock_acc = stock["results"]["cfsp_piqa"]["acc,none"]
    assert stock_acc == ours["tasks"]["piqa"]["acc"]
    samples = sorted(stock["samples"]["cfsp_piqa"], key=lambda x: x["doc_id"])
    stock_ll = [[float(r[0]) for r in x["filtered_resps"]] for x in samples]
    torch.testing.assert_close(
        torch.tensor(stock_ll),
        torch.tensor(ours["tasks"]["piqa"]["loglikelihoods"]),
        atol=1e-3,
        rtol=0,
    )


def test_write_exports_beside_a_checkpoint_with_measured_quality(tmp_path, tiny_tokenizer):
    """What `cfsp run` does with export.kinds: kinds other than compact are written beside the
    run's compact checkpoint, their model cards stating the perplexity the run measured."""
    from cfsp.export import write_exports

    model, windows, manifest = _prune("llama-gqa", PruneConfig(reconstruct="none", **PER_BLOCK))
    compact = _save(model, tiny_tokenizer, manifest, tmp_path / "run", "compact")
    assert write_exports(compact, ["compact"]) == {"compact": str(compact)}
    paths = write_exports(compact, ["compact", "padded"], quality={"perplexity (pruned)": 12.5})
    padded = tmp_path / "run-padded"
    assert paths == {"compact": str(compact), "padded": str(padded)}
    assert "- perplexity (pruned): 12.5" in _published(padded)
    stock = AutoModelForCausalLM.from_pretrained(padded).eval()
    torch.testing.assert_close(_logits(stock, windows.ids), _logits(model, windows.ids))


def test_sweep_refuses_a_stock_export_it_could_not_write_before_any_work(tmp_path):
    """params.yaml asking for padded exports of a model whose LIAR biases no stock code holds:
    the request check (run before Prefect starts) refuses it, naming the compact export."""
    from cfsp.preflight import check_params

    for name in ("qwen3-gqa", "mistral-gqa"):
        tiny_model(name).save_pretrained(tmp_path / name)
    kinds = {"kinds": ["compact", "padded"]}
    out = str(tmp_path / "out")
    refused = Params(models=[str(tmp_path / "qwen3-gqa")], export=kinds, output=out)
    with pytest.raises(UsageError, match="down_proj.*trust_remote_code=True"):
        check_params(refused)
    check_params(Params(models=[str(tmp_path / "mistral-gqa")], export=kinds, output=out))
    check_params(Params(models=[str(tmp_path / "qwen3-gqa")], output=out))  # compact only
    assert not (tmp_path / "out").exists()
