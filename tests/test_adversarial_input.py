"""Reliability round 2 (docs/reliability.md, rows 59 on): bad requests and outputs.

Every case runs the CLI in-process (`cfsp.cli.main`) on a tiny random-init model and checks the
exit code (2 for a bad request, 1 for a failed valid one), one `error:` line with a distinctive
part of the message, no traceback, and that nothing was written or left behind. Cases that
could hang (a FIFO in place of a file) run under a watchdog.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cfsp.cli import main
from tests.test_catalogue import build_project, cli, error_line, hidden, prune_args, snapshot


@pytest.fixture(scope="module")
def proj(tmp_path_factory, tiny_tokenizer):
    """A tiny model, a text, a params.yaml and a finished (per-block) checkpoint."""
    return build_project(tmp_path_factory.mktemp("adversarial"), tiny_tokenizer)


@pytest.fixture(autouse=True)
def watchdog():
    """Fail a test that blocks (a FIFO opened for reading) instead of hanging the suite."""

    def expire(*_):
        raise TimeoutError("blocked for 60 s: a FIFO or device was opened")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def copy_model(proj: Path, dest: Path, name: str = "tiny") -> Path:
    shutil.copytree(proj / name, dest)
    return dest


def expect(capsys, args, code: int, match: str) -> str:
    """Run the CLI; check the exit code and one error line holding `match`."""
    got, _, err = cli(capsys, *args)
    line = error_line(err)
    assert got == code, line
    assert match in line, line
    return line


def eval_args(model: Path, proj: Path, *extra) -> list:
    return ["eval", "--model", model, "--data", f"file:{proj / 'text.txt'}", "--seqlen", "16",
            "--limit", "2", *extra]  # fmt: skip


# -- 1. wrong results with exit 0 ---------------------------------------------------------------
def _edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda t: t.pop("model.layers.1.mlp.down_proj.weight"),
            "missing model.layers.1.mlp.down_proj.weight",
        ),
        (
            lambda t: t.update({"model.layers.9.extra.weight": t["model.norm.weight"].clone()}),
            "unexpected model.layers.9.extra.weight",
        ),
        (
            lambda t: t.update(
                {"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"][:90]}
            ),
            "model.layers.0.mlp.up_proj.weight",
        ),
    ],
    ids=["missing-tensor", "unexpected-tensor", "wrong-shape"],
)
def test_dense_weights_that_do_not_match_the_config(proj, tmp_path, capsys, edit, match):
    model = copy_model(proj, tmp_path / "m")
    _edit_weights(model, edit)
    line = expect(capsys, eval_args(model, proj), 1, match)
    assert "do not match" in line or "could not load" in line


def test_pruned_checkpoint_missing_a_tensor(proj, tmp_path, capsys):
    ckpt = copy_model(proj, tmp_path / "c", "ckpt")
    _edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    expect(capsys, eval_args(ckpt, proj), 1, "missing ['model.layers.1.mlp.down_proj.weight']")


@pytest.mark.parametrize(
    "edit",
    [
        lambda w: w[0].update(intermediate_size=w[0]["intermediate_size"] + 1),
        lambda w: w[1].update(num_key_value_heads=0),
        lambda w: w.pop(),
        lambda w: w[0].pop("num_attention_heads"),
    ],
    ids=["width-plus-one", "zero-kv-heads", "one-block-short", "key-missing"],
)
def test_edited_layer_widths(proj, tmp_path, capsys, edit):
    ckpt = copy_model(proj, tmp_path / "c", "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    edit(config["cfsp_layer_widths"])
    (ckpt / "config.json").write_text(json.dumps(config))
    expect(capsys, eval_args(ckpt, proj), 1, "cfsp_layer_widths in config.json do not match")


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--budget", "0.6", "--round-to", "128"], "cannot be met with round_to 128"),
        (["--budget", "0.5", "--round-to", "64"], "it reaches budgets up to 0.231"),
        (["--budget", "0.5", "--round-to", "64", "--method", "flap"], "round_to 64"),
        (["--budget", "0.6", "--round-to", "128", "--structures", "ffn+heads"], "round_to 128"),
    ],
    ids=["ffn-128-of-96", "ffn-64-of-96", "flap-64", "heads-128"],
)
def test_round_to_that_cannot_meet_the_budget(proj, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    expect(capsys, prune_args(proj, out, *extra), 2, match)
    assert not out.exists() and hidden(tmp_path) == []


def test_round_to_that_can_meet_the_budget(proj, tmp_path, capsys):
    args = prune_args(proj, tmp_path / "o", "--budget", "0.25", "--round-to", "64",
                      "--allocation", "uniform")  # fmt: skip
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    assert "removed 23.08%" in stdout


@pytest.mark.parametrize(
    "rows,match",
    [
        ('{"text": null}\n', "row 1 has text null"),
        ('{"text": "ok"}\n{"text": 123}\n', "row 2 has text of type int"),
        ('{"text": ["a"]}\n', "text of type list"),
        ('{"body": "x"}\n', "row 1 has no 'text' field"),
        ("[1, 2]\n", "row 1 has no 'text' field"),
        ('"just a string"\n', "row 1 has no 'text' field"),
    ],
    ids=["null", "int", "list", "no-key", "row-is-list", "row-is-string"],
)
def test_jsonl_rows_without_string_text(proj, tmp_path, capsys, rows, match):
    source = tmp_path / "rows.jsonl"
    source.write_text(rows)
    args = prune_args(proj, tmp_path / "out", "--calib", f"file:{source}")
    expect(capsys, args, 2, match)
    assert not (tmp_path / "out").exists()


# -- 2. data loss --------------------------------------------------------------------------------
def test_overwrite_never_deletes_the_current_directory(proj, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work)
    before = snapshot(work)
    expect(capsys, prune_args(proj, ".", "--overwrite"), 2, "is the current directory")
    expect(capsys, prune_args(proj, "..", "--overwrite"), 2, "a parent of the current directory")
    assert snapshot(work) == before


@pytest.mark.parametrize("target", ["/", "~"], ids=["root", "home"])
def test_root_and_home_are_never_outputs(proj, tmp_path, capsys, monkeypatch, target):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "keep.txt").write_text("mine")
    what = "root" if target == "/" else "home"
    expect(capsys, prune_args(proj, target, "--overwrite"), 2, f"is the {what} directory")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_cfsp_outputs(proj, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "results.csv").write_text("1,2,3")
    before = snapshot(data)
    line = expect(capsys, prune_args(proj, data, "--overwrite"), 2, "is not a cfsp output")
    assert "even with --overwrite" in line
    assert snapshot(data) == before and hidden(tmp_path) == []


def test_stage_output_that_is_someones_folder(proj, tmp_path, capsys):
    """Stages always replace their output: a folder that is not a cfsp output is refused."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("keep me")
    args = ["stage", "prepare", "--model", proj / "tiny", "--out", data,
            "--params", proj / "params.yaml"]  # fmt: skip
    expect(capsys, args, 2, "is not a cfsp output")
    assert (data / "notes.txt").read_text() == "keep me"


# -- 3. numeric bounds ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,match",
    [
        (["--nsamples", "1000000000000"], "nsamples: Input should be less than or equal to 104"),
        (["--nsamples", "300000", "--seqlen", "128"], "more than the 33,554,432 one run may hold"),
        (["--seqlen", "2000000"], "seqlen: Input should be less than or equal to 1048576"),
        (["--seed", "100000000000000000000000"], "seed: Input should be less than or equal to"),
        (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
        (["--temperature", "inf"], "temperature: Input should be a finite number"),
        (["--temperature", "nan"], "temperature: Input should be a finite number"),
        (["--temperature", "0"], "temperature: Input should be greater than 0"),
        (["--control", "-1"], "control: expected 'auto' or a finite number >= 0, got '-1'"),
        (["--damping", "nan"], "damping: Input should be a finite number"),
        (["--round-to", "3"], "round_to: Input should be 1, 8, 64 or 128"),
        (["--stats", "magic"], "stats: Input should be 'dense', 'sequential' or 'target'"),
        (["--method", ""], "unknown method ''"),
        (["--dtype", ""], "unknown dtype ''"),
    ],
    ids=[
        "nsamples-1e12",
        "tokens-over-bound",
        "seqlen-huge",
        "seed-1e23",
        "seed-negative",
        "temperature-inf",
        "temperature-nan",
        "temperature-0",
        "control-negative",
        "damping-nan",
        "round-to-3",
        "stats",
        "method-empty",
        "dtype-empty",
    ],
)
def test_out_of_bounds_prune_options(proj, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    expect(capsys, prune_args(proj, out, *extra), 2, match)
    assert not out.exists()


@pytest.mark.parametrize(
    "option,value", [("--nsamples", "1e12"), ("--seed", "1e23"), ("--seqlen", "16.5")]
)
def test_unparsable_integers_are_typers_usage_errors(
    proj, tmp_path, capsys, monkeypatch, option, value
):
    monkeypatch.setenv("COLUMNS", "200")
    code, _, err = cli(capsys, *prune_args(proj, tmp_path / "out", option, value))
    assert code == 2 and "Traceback" not in err
    assert f"Invalid value for '{option}': Input should be a valid integer" in err


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--seqlen", "1"], "seqlen: Input should be greater than or equal to 2"),
        (["--limit", "0"], "limit: Input should be greater than 0"),
        (["--limit", "2000000"], "limit: Input should be less than or equal to 1048576"),
        (["--speed-batch", "0"], "speed.batch: Input should be greater than 0"),
    ],
    ids=["seqlen-1", "limit-0", "limit-huge", "speed-batch-0"],
)
def test_out_of_bounds_eval_options(proj, capsys, extra, match):
    args = ["eval", "--model", proj / "tiny", "--data", f"file:{proj / 'text.txt'}", *extra]
    expect(capsys, args, 2, match)


# -- 4. params.yaml and --set --------------------------------------------------------------------
def _params(proj: Path, tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BASE = "models: [M]\noutput: OUT\n"


@pytest.mark.parametrize(
    "text,match",
    [
        ("budgets: [0.3]\nbudgets: [0.5]\n", "YAML (line 4, column 1): duplicate key 'budgets'"),
        ("prepare:\n  seed: 1\n  seed: 2\n", "duplicate key 'seed'"),
        ("reconstruct: {damping: .inf}\n", "reconstruct.damping: Input should be a finite number"),
        ("allocate: {temperature: .nan}\n", "allocate.temperature: Input should be a finite"),
        ("allocate: {exponent: x}\n", "allocate.exponent: expected 'auto' or a finite number"),
        ("allocate: {control: steep}\n", "allocate.control: expected 'auto' or a finite number"),
        ("prepare: {heldout: -1}\n", "prepare.heldout: Input should be greater than or equal"),
        ("recover: {lr: .inf}\n", "recover.lr: Input should be a finite number"),
        ("prepare: {nsamples: 1.0e+12}\n", "prepare.nsamples: Input should be less than or equal"),
        ("prepare: {nsamples: 1e12}\n", "prepare.nsamples: Input should be a valid integer"),
        ("prepare: {seed: 1.0e+23}\n", "prepare.seed: "),
        ("evaluate: {seqlen: 1}\n", "evaluate.seqlen: Input should be greater than or equal to 2"),
        ("evaluate: {limit: 1048576, seqlen: 128}\n", "limit x seqlen: 1048576 windows x 128"),
        ("evaluate: {speed: {batch: 100000, seqlen: 1000}}\n", "speed.batch x speed.seqlen"),
        ("capture: {batch_size: 0}\n", "capture.batch_size: Input should be greater than 0"),
        ("budgets: []\n", "budgets: List should have at least 1 item"),
        ("methods: []\n", "methods: List should have at least 1 item"),
        ("budgets: [0.3, 0.3]\n", "budgets: 0.3 listed twice"),
        ("methods: [cfsp, cfsp]\n", "methods: cfsp listed twice"),
        ("methods: ['cfsp+budget=0.5']\n", "'budget' is set by the grid (budgets in params.yaml)"),
        ("methods: ['cfsp+method=flap']\n", "'method' is set by the grid (methods"),
        ("methods: ['cfsp+damping=inf']\n", "damping: Input should be a finite number"),
        ("methods: ['cfsp+round_to=3']\n", "round_to: Input should be 1, 8, 64 or 128"),
        ("methods: ['cfsp+damping=1+damping=2']\n", "'damping' is given twice"),
        ("prepare: 5\n", "prepare: Input should be a valid dictionary"),
        ("budgets: 0.3\n", "budgets: Input should be a valid list"),
    ],
    ids=[
        "dup-budgets",
        "dup-nested",
        "damping-inf",
        "temperature-nan",
        "exponent-x",
        "control-word",
        "heldout-negative",
        "lr-inf",
        "nsamples-1e12",
        "nsamples-1e12-string",
        "seed-1e23",
        "eval-seqlen-1",
        "eval-tokens",
        "speed-tokens",
        "batch-size-0",
        "empty-budgets",
        "empty-methods",
        "repeated-budget",
        "repeated-method",
        "variant-budget",
        "variant-method",
        "variant-damping-inf",
        "variant-round-to",
        "variant-key-twice",
        "section-scalar",
        "grid-scalar",
    ],
)
def test_bad_params_file_fails_before_any_work(proj, tmp_path, capsys, text, match):
    base = BASE.replace("M", str(proj / "tiny")).replace("OUT", str(tmp_path / "out"))
    path = _params(proj, tmp_path, base + text)
    expect(capsys, ["run", "--params", path], 2, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(
    "encoding,match",
    [("utf-16", "is not UTF-8 text (byte 0)"), ("latin-1", "is not UTF-8 text")],
)
def test_params_file_that_is_not_utf8(proj, tmp_path, capsys, encoding, match):
    path = _params(proj, tmp_path, "# café\nbudgets: [0.3]\n".encode(encoding))
    expect(capsys, ["run", "--params", path], 2, match)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_params_file_that_is_not_a_regular_file(tmp_path, capsys, kind):
    path = tmp_path / "params.yaml"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    what = "a named pipe (FIFO)" if kind == "fifo" else "a directory"
    expect(capsys, ["run", "--params", path], 2, f"is {what}, not a regular file")


@pytest.mark.parametrize(
    "override,match",
    [
        ("budgets.x=1", "--set 'budgets.x=1': budgets is list, not a section with keys"),
        ("prepare.seed.x=1", "prepare.seed is int, not a section"),
        ("budgets=[]", "budgets: List should have at least 1 item"),
        ("budgets=[0.3", "--set 'budgets=[0.3': the value is not valid YAML"),
        ("prepare={seed: 1, seed: 2}", "duplicate key 'seed'"),
        ("=1", "expected dotted.key=value"),
        ("prepare..seed=1", "expected dotted.key=value"),
        ("methods=[cfsp+budget=0.5]", "'budget' is set by the grid"),
        ("reconstruct.damping=.inf", "reconstruct.damping: Input should be a finite number"),
        ("prepare.nsamples=1.0e+12", "prepare.nsamples: Input should be less than or equal"),
    ],
    ids=[
        "into-list",
        "into-scalar",
        "empty-grid",
        "bad-yaml",
        "dup-key",
        "no-key",
        "empty-part",
        "variant-budget",
        "damping-inf",
        "nsamples-1e12",
    ],
)
def test_bad_set_overrides(proj, capsys, override, match):
    expect(capsys, ["run", "--params", proj / "params.yaml", "-S", override], 2, match)


def test_missing_model_inside_run(proj, tmp_path, capsys):
    text = f"models: [{tmp_path / 'nope'}]\noutput: {tmp_path / 'out'}\n"
    expect(capsys, ["run", "--params", _params(proj, tmp_path, text)], 2, "not found")
    assert not (tmp_path / "out").exists()


# -- 4. damaged checkpoints ----------------------------------------------------------------------
def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header = edit(header)
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda h: h | {_first(h): h[_first(h)] | {"dtype": "F33"}}, "unknown dtype 'F33'"),
        (lambda h: h | {_first(h): h[_first(h)] | {"dtype": "F16"}}, "needs"),
        (lambda h: h | {_first(h): h[_first(h)] | {"shape": [3, 5]}}, "its range"),
        (lambda h: h | {_first(h): h[_first(h)] | {"shape": "48"}}, "is not a list of sizes"),
        (lambda h: h | {_first(h): h[_first(h)] | {"shape": [-1]}}, "is not a list of sizes"),
        (lambda h: h | {_first(h): h[_first(h)] | {"data_offsets": [0]}}, "is not [begin, end]"),
        (lambda h: h | {_first(h): 7}, "entry is not an object"),
        (lambda h: list(h), "header is not a JSON object"),
    ],
    ids=[
        "dtype-name",
        "dtype-size",
        "shape-size",
        "shape-string",
        "shape-negative",
        "offsets",
        "entry",
        "header-list",
    ],
)
def test_safetensors_headers_that_lie(proj, tmp_path, capsys, edit, match):
    model = copy_model(proj, tmp_path / "m")
    _rewrite_header(model / "model.safetensors", edit)
    line = expect(capsys, eval_args(model, proj), 1, "corrupt safetensors file")
    assert match in line


@pytest.mark.parametrize(
    "name,what",
    [
        ("model.safetensors", "a named pipe (FIFO)"),
        ("config.json", "a named pipe (FIFO)"),
        ("tokenizer.json", "a named pipe (FIFO)"),
        ("model.safetensors", "a dangling symbolic link"),
    ],
    ids=["weights-fifo", "config-fifo", "tokenizer-fifo", "weights-dangling"],
)
def test_model_files_that_are_not_regular(proj, tmp_path, capsys, name, what):
    model = copy_model(proj, tmp_path / "m")
    (model / name).unlink()
    if "FIFO" in what:
        os.mkfifo(model / name)
    else:
        (model / name).symlink_to(tmp_path / "gone")
    for args in (eval_args(model, proj), prune_args(proj, tmp_path / "o", "--model", model)):
        expect(capsys, args, 2, what)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "text,code,match",
    [
        ("{not json", 1, "config.json is not valid JSON"),
        ("[1, 2]", 1, "config.json holds a JSON array, expected a JSON object"),
    ],
    ids=["config-not-json", "config-a-list"],
)
def test_config_json_that_is_not_a_config(proj, tmp_path, capsys, text, code, match):
    model = copy_model(proj, tmp_path / "m")
    (model / "config.json").write_text(text)
    expect(capsys, eval_args(model, proj), code, match)


# -- 4. stage artifacts of the wrong structure ---------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(proj):
    """prepare, capture and allocate outputs of the tiny model."""
    root = proj / "stages"
    base = ["stage", "--help"][:1]
    params = ["--params", proj / "params.yaml"]
    model = ["--model", proj / "tiny"]
    steps = [
        ["prepare", *model, "--out", root / "tokens", *params],
        ["capture", *model, "--tokens", root / "tokens", "--out", root / "stats", *params],
        [
            "allocate",
            *model,
            "--stats",
            root / "stats",
            "--tokens",
            root / "tokens",
            "--out",
            root / "alloc",
            "--budget",
            "0.3",
            "--method",
            "cfsp",
            *params,
        ],  # fmt: skip
    ]
    for step in steps:
        assert main([str(a) for a in base + step]) == 0
    return root


def _prune_stage(proj: Path, artifacts: Path, alloc: Path, out: Path) -> list:
    return ["stage", "prune", "--model", proj / "tiny", "--stats", artifacts / "stats",
            "--allocation", alloc, "--out", out, "--budget", "0.3", "--method", "cfsp",
            "--params", proj / "params.yaml"]  # fmt: skip


@pytest.mark.parametrize(
    "payload,match",
    [
        ([1, 2], "holds a JSON array, expected a JSON object"),
        ({"keep_ratios": [1.0]}, "is not an allocation (no 'blocks' entry)"),
        ({"keep_ratios": [1.0, 1.0], "blocks": [{"bogus": 1}]}, "is not an allocation"),
        ({"keep_ratios": 1, "blocks": []}, "is not an allocation"),
        ("null", "holds a string, expected a JSON object"),
    ],
    ids=["list", "no-blocks", "bad-block", "ratios-scalar", "string"],
)
def test_allocation_of_the_wrong_structure(proj, artifacts, tmp_path, capsys, payload, match):
    alloc = tmp_path / "allocation.json"
    alloc.write_text(json.dumps(payload))
    out = tmp_path / "pruned"
    args = _prune_stage(proj, artifacts, alloc, out)
    expect(capsys, args, 1, match)
    assert not out.exists()


def test_allocation_whose_choice_record_is_not_a_mapping(proj, artifacts, tmp_path, capsys):
    """The choice record travels into the manifest: a broken one is refused, not copied."""
    payload = json.loads((artifacts / "alloc" / "allocation.json").read_text())
    payload["control_choice"] = [0.5]
    alloc = tmp_path / "allocation.json"
    alloc.write_text(json.dumps(payload))
    out = tmp_path / "pruned"
    args = _prune_stage(proj, artifacts, alloc, out)
    expect(capsys, args, 1, "is not an allocation (control_choice is not a mapping)")
    assert not out.exists()


def _capture(proj: Path, tokens: Path, out: Path) -> list:
    return ["stage", "capture", "--model", proj / "tiny", "--tokens", tokens, "--out", out,
            "--params", proj / "params.yaml"]  # fmt: skip


@pytest.mark.parametrize(
    "tensors,metadata,match",
    [
        ("ids", None, "is not a calibration tokens file (no 'fingerprint' entry)"),
        ("ids", "{broken", "is not a calibration tokens file"),
        ("ids", "[1]", "expected integer ids"),
        ("float", '{"hash": "x"}', "expected integer ids"),
        ("none", '{"hash": "x"}', "is not a calibration tokens file"),
    ],
    ids=["no-fingerprint", "fingerprint-not-json", "fingerprint-list", "float-ids", "no-ids"],
)
def test_tokens_of_the_wrong_structure(proj, tmp_path, capsys, tensors, metadata, match):
    import torch

    ids = {"ids": torch.zeros(2, 16, dtype=torch.int64)}
    ids = {"float": {"ids": torch.zeros(2, 16)}, "none": {"other": torch.zeros(2)}}.get(
        tensors, ids
    )
    path = tmp_path / "tokens.safetensors"
    save_file(ids, str(path), metadata=None if metadata is None else {"fingerprint": metadata})
    expect(capsys, _capture(proj, path, tmp_path / "stats"), 1, match)
    assert not (tmp_path / "stats").exists()


def test_tokens_that_are_a_fifo(proj, tmp_path, capsys):
    os.mkfifo(tmp_path / "tokens.safetensors")
    expect(capsys, _capture(proj, tmp_path / "tokens.safetensors", tmp_path / "s"), 2, "FIFO")


@pytest.mark.parametrize(
    "payload,match",
    [
        ([], "holds a JSON array, expected a JSON object"),
        ({"keep_ratios": [1.0]}, "is not an allocation (no 'blocks' entry)"),
    ],
    ids=["list", "no-blocks"],
)
def test_reconstruct_from_an_allocation_of_the_wrong_structure(
    proj, artifacts, tmp_path, capsys, payload, match
):
    """reconstruct reads the kept indices from the allocation artifact, checked as prune does."""
    alloc = tmp_path / "allocation.json"
    alloc.write_text(json.dumps(payload))
    out = tmp_path / "rec"
    args = ["stage", "reconstruct", "--model", proj / "tiny", "--allocation", alloc, "--stats",
            artifacts / "stats", "--tokens", artifacts / "tokens", "--out", out, "--budget",
            "0.3", "--method", "cfsp", "--params", proj / "params.yaml"]  # fmt: skip
    expect(capsys, args, 1, match)
    assert not out.exists()


def test_existing_output_whose_manifest_is_a_list(proj, tmp_path, capsys):
    ckpt = copy_model(proj, tmp_path / "c", "ckpt")
    (ckpt / "cfsp_manifest.json").write_text("[]")
    before = snapshot(ckpt)
    expect(capsys, prune_args(proj, ckpt), 1, "holds a JSON array, expected a JSON object")
    assert snapshot(ckpt) == before


def test_verify_with_hashes_of_the_wrong_structure(proj, tmp_path, capsys):
    ckpt = copy_model(proj, tmp_path / "c", "ckpt")
    manifest = json.loads((ckpt / "cfsp_manifest.json").read_text())
    manifest["weights_sha256"] = ["model.safetensors"]
    (ckpt / "cfsp_manifest.json").write_text(json.dumps(manifest))
    expect(capsys, ["verify", ckpt], 1, "weights_sha256 in cfsp_manifest.json is not a mapping")


# -- 4. environment variables --------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["file", "under-a-file"])
def test_cfsp_home_that_cannot_hold_the_cache(proj, tmp_path, capsys, monkeypatch, layout):
    (tmp_path / "afile").write_text("x")
    home = tmp_path / "afile" if layout == "file" else tmp_path / "afile" / "cache"
    monkeypatch.setenv("CFSP_HOME", str(home))
    out = tmp_path / "out"
    args = ["prune", "--model", "smollm2-135m", "--out", out]
    expect(capsys, args, 2, f"CFSP_HOME={home} cannot hold cfsp's cache")
    assert not out.exists() and (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("layout", ["file", "missing", "fifo-copy"])
def test_cfsp_data_dir_that_is_not_a_data_folder(proj, tmp_path, capsys, monkeypatch, layout):
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("x")
    elif layout == "fifo-copy":
        (root / "wikitext2").mkdir(parents=True)
        os.mkfifo(root / "wikitext2" / "wiki.test.raw")
    monkeypatch.setenv("CFSP_DATA_DIR", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from cfsp.data import hub_reachable

    hub_reachable.cache_clear()
    match = {
        "file": "is not a directory",
        "missing": "does not exist",
        "fifo-copy": "is a named pipe (FIFO), not a regular file",
    }[layout]
    expect(capsys, ["eval", "--model", proj / "tiny", "--data", "wikitext2"], 2, match)
    hub_reachable.cache_clear()


# -- 5. output paths -----------------------------------------------------------------------------
def test_output_that_is_a_dangling_symlink(proj, tmp_path, capsys):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    expect(capsys, prune_args(proj, link), 2, "is a dangling symbolic link")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_output_that_links_to_another_checkpoint(proj, tmp_path, capsys):
    other = copy_model(proj, tmp_path / "other", "ckpt")
    before = snapshot(other)
    link = tmp_path / "out"
    link.symlink_to(other)
    expect(capsys, prune_args(proj, link, "--budget", "0.5", "--overwrite"), 2, "symbolic link")
    assert snapshot(other) == before and link.is_symlink()


@pytest.mark.parametrize("length", [250, 300])
def test_output_name_too_long(proj, tmp_path, capsys, length):
    out = tmp_path / ("n" * length)
    expect(capsys, prune_args(proj, out), 2, "bytes; at most 239 are allowed")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("kind", ["fifo", "file-with-suffix"])
def test_output_that_is_not_a_directory(proj, tmp_path, capsys, kind):
    out = tmp_path / ("out" if kind == "fifo" else "out.v1")
    os.mkfifo(out) if kind == "fifo" else out.write_text("x")
    expect(capsys, prune_args(proj, out, "--overwrite"), 2, "exists and is not a directory")
    assert out.exists()


def test_output_below_a_file(proj, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    expect(capsys, prune_args(proj, tmp_path / "afile" / "ckpt"), 2, "is not a directory")


def test_eval_out_onto_a_folder_fails_before_evaluation(proj, tmp_path, capsys, monkeypatch):
    import cfsp.evaluation.from_spec as api

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "old.json").write_text("{}")
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("evaluated first"))
    expect(capsys, eval_args(proj / "tiny", proj, "--out", folder), 2, "is an existing directory")
    assert (folder / "old.json").read_text() == "{}"


def test_eval_out_dangling_symlink(proj, tmp_path, capsys):
    link = tmp_path / "r.json"
    link.symlink_to(tmp_path / "nowhere.json")
    expect(capsys, eval_args(proj / "tiny", proj, "--out", link), 2, "dangling symbolic link")


def test_stage_metrics_onto_a_folder_fails_before_evaluation(proj, tmp_path, capsys):
    (tmp_path / "metrics").mkdir()
    args = ["stage", "evaluate", "--model", proj / "ckpt", "--out", tmp_path / "eval",
            "--metrics", tmp_path / "metrics", "--params", proj / "params.yaml"]  # fmt: skip
    expect(capsys, args, 2, "is an existing directory")
    assert not (tmp_path / "eval").exists()


# -- 6. text sources that are not regular files ---------------------------------------------------
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: os.mkfifo(p), "is a named pipe (FIFO), not a regular file"),
        (lambda p: p.mkdir(), "is a directory, not a regular file"),
        (lambda p: p.symlink_to(p.parent / "gone"), "is a dangling symbolic link"),
        (lambda p: p.write_bytes("caf\xe9".encode("latin-1") * 200), "is not UTF-8 text"),
    ],
    ids=["fifo", "directory", "dangling", "latin-1"],
)
def test_text_files_that_cannot_be_read(proj, tmp_path, capsys, make, match):
    source = tmp_path / "text.txt"
    make(source)
    expect(capsys, prune_args(proj, tmp_path / "out", "--calib", f"file:{source}"), 2, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "spec,match",
    [("file:", "give a path after 'file:'"), ("file:/dev/zero", "character device")],
    ids=["no-path", "dev-zero"],
)
def test_odd_text_specs(proj, tmp_path, capsys, spec, match):
    expect(capsys, prune_args(proj, tmp_path / "out", "--calib", spec), 2, match)
