"""The bad-input catalogue (docs/reliability.md): each entry without a test elsewhere is tested
here, through the CLI in-process (`cfsp.cli.main`) on tiny random-init models.

Every test checks the exit code, a distinctive part of the one-line message, and, where
something would be written, that nothing partial is left and existing artifacts are unchanged.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from cfsp.cli import main
from cfsp.io import sha256_file
from tests.conftest import TEXT, tiny_model


# -- helpers --------------------------------------------------------------------------------------
def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def hidden(directory: Path) -> list[str]:
    """Temporary names (.NAME.tmp-*, .NAME.old-*, .cfsp-probe-*) left in a directory."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def build_project(root: Path, tokenizer) -> Path:
    """A tiny model, a text, a params.yaml (absolute paths) and a finished checkpoint."""
    tiny_model("llama-gqa").save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "text.txt").write_text(TEXT)
    params = {
        "models": [str(root / "tiny")],
        "budgets": [0.3],
        "methods": ["cfsp"],
        "output": str(root / "out"),
        "prepare": {"source": f"file:{root / 'text.txt'}", "nsamples": 4, "seqlen": 16},
        "evaluate": {"perplexity": [f"file:{root / 'text.txt'}"], "seqlen": 16, "limit": 2},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    code = main([str(a) for a in prune_args(root, root / "ckpt", "--budget", "0.3")])
    assert code == 0
    return root


@pytest.fixture(scope="module")
def proj(tmp_path_factory, tiny_tokenizer):
    return build_project(tmp_path_factory.mktemp("catalogue"), tiny_tokenizer)


def prune_args(root: Path, out: Path, *extra) -> list:
    return [
        "prune",
        "--model",
        root / "tiny",
        "--calib",
        f"file:{root / 'text.txt'}",
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        # per-block widths (the tests read modeling_cfsp.py); auto may choose the uniform plan
        "--control",
        "0.5",
        "--out",
        out,
        *extra,
    ]


@pytest.fixture
def ckpt(proj, tmp_path) -> Path:
    """A copy of the finished checkpoint, alone in a fresh directory."""
    shutil.copytree(proj / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


# -- CLI options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,match",
    [
        (["--budget", "1.0"], "invalid prune options: budget: Input should be less than 1"),
        (["--budget", "-0.1"], "budget: Input should be greater than or equal to 0"),
        (["--budget", "nan"], "budget: Input should be a finite number"),
        (["--budget", "inf"], "budget: Input should be a finite number"),
        (["--criterion", "magic"], "criterion: Input should be 'cfsp', 'act_norm', 'wanda_sp'"),
        (["--allocation", "magic"], "allocation: Input should be 'cfsp', 'uniform' or 'flap'"),
        (["--reconstruct", "magic"], "reconstruct: Input should be 'liar', 'bias' or 'none'"),
        (["--structures", "heads"], "structures: Input should be 'ffn+heads' or 'ffn'"),
        (["--seqlen", "0"], "invalid calibration options: seqlen: Input should be greater than 0"),
        (["--nsamples", "0"], "calibration options: nsamples: Input should be greater than 0"),
        (["--seqlen", "300"], "seqlen 300 exceeds the model's context (256 tokens)"),
        (["--calib", "wikitext3"], "unknown text source 'wikitext3'; use one of botchan"),
        (["--dtype", "float8"], "unknown dtype 'float8'; choose one of float32"),
    ],
    ids=[
        "budget-1",
        "budget-negative",
        "budget-nan",
        "budget-inf",
        "criterion",
        "allocation",
        "reconstruct",
        "structures",
        "seqlen-0",
        "nsamples-0",
        "seqlen-over-context",
        "text-source",
        "dtype",
    ],
)
def test_bad_prune_options_exit_2(proj, ckpt, capsys, extra, match):
    before = snapshot(ckpt)
    code, _, err = cli(capsys, *prune_args(proj, ckpt, "--overwrite", *extra))
    assert code == 2
    assert match in error_line(err)
    assert snapshot(ckpt) == before and hidden(ckpt.parent) == []


def test_misspelled_option_is_typers_usage_error(proj, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "pruned"
    code, _, err = cli(capsys, *prune_args(proj, out, "--budgte", "0.3"))
    assert code == 2
    assert "No such option: --budgte" in err and "--budget" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--budget", "0.99"], "budget 0.990 would keep less than the floor 0.05 per block; the "),
        (["--budget", "0.95"], "budget 0.95 cannot be met: the allocation reaches 0.68"),
        (
            ["--budget", "0.97", "--allocation", "uniform", "--structures", "ffn+heads"],
            "(blocks at their minimum width); choose a smaller budget",
        ),
        (
            ["--budget", "0.97", "--allocation", "flap", "--structures", "ffn+heads"],
            "(blocks at their minimum width); choose a smaller budget",
        ),
    ],
    ids=["cfsp-over-floor", "ffn-only", "uniform-heads", "flap-heads"],
)
def test_budget_that_would_empty_a_block_is_refused(proj, tmp_path, capsys, extra, match):
    out = tmp_path / "pruned"
    code, _, err = cli(capsys, *prune_args(proj, out, *extra))
    assert code == 2
    assert match in error_line(err)
    assert not out.exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("allocation", ["cfsp", "uniform", "flap"])
def test_extreme_feasible_budget_keeps_one_of_everything(proj, tmp_path, capsys, allocation):
    from cfsp.arch import adapter_for
    from cfsp.models import load_model

    out = tmp_path / "pruned"
    args = ["--budget", "0.85", "--structures", "ffn+heads", "--allocation", allocation]
    code, _, err = cli(capsys, *prune_args(proj, out, *args))
    assert code == 0, err
    loaded = load_model(str(out))
    widths = adapter_for(loaded.model).block_widths(loaded.model)
    assert all(w.num_heads >= 1 and w.num_kv_heads >= 1 and w.intermediate >= 1 for w in widths)
    assert min(w.num_heads for w in widths) == 1  # some block is down to its last head
    with torch.no_grad():
        assert torch.isfinite(loaded.model(torch.arange(8)[None]).logits).all()


# -- params.yaml and the DVC stages ---------------------------------------------------------------
@pytest.mark.parametrize(
    "edit,match",
    [
        (("budgets:", "budget:"), ("budget: unknown key (allowed: models, budgets", "'budgets'?")),
        (("nsamples:", "nsample:"), "prepare.nsample: unknown key"),
        (("- cfsp", "- sparsegpt"), "methods: 'sparsegpt': unknown method 'sparsegpt'; choose"),
        (("- cfsp", "- cfsp+foo=1"), "methods: 'cfsp+foo=1': foo: unknown key (allowed:"),
        (("- 0.3", "- 1.3"), "budgets: 1.3 is not in [0, 1)"),
        (("models:", "models: ["), "is not valid YAML (line 2, column 1): expected the node"),
    ],
    ids=["key-typo", "nested-key-typo", "method", "variant-key", "budget", "yaml-syntax"],
)
def test_bad_params_file_stops_a_stage(proj, tmp_path, capsys, edit, match):
    params = tmp_path / "params.yaml"
    params.write_text((proj / "params.yaml").read_text().replace(*edit, 1))
    out = tmp_path / "prepared"
    code, _, err = cli(
        capsys, "stage", "prepare", "--model", proj / "tiny", "--out", out, "--params", params
    )
    assert code == 2
    line = error_line(err)
    assert all(part in line for part in ([match] if isinstance(match, str) else match)), line
    assert not out.exists() and hidden(tmp_path) == []


def test_missing_or_shapeless_params_file(proj, tmp_path, capsys):
    out = tmp_path / "prepared"
    base = ("stage", "prepare", "--model", proj / "tiny", "--out", out, "--params")
    code, _, err = cli(capsys, *base, tmp_path / "nope.yaml")
    assert code == 2 and "params file" in error_line(err) and "nope.yaml does not exist" in err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    code, _, err = cli(capsys, *base, tmp_path / "list.yaml")
    assert code == 2 and "list.yaml must hold a mapping of sections" in error_line(err)
    assert not out.exists()


@pytest.mark.parametrize(
    "override,match",
    [
        ("budgets", "--set 'budgets': expected dotted.key=value"),
        ("prepare.nsample=3", "prepare.nsample: unknown key (allowed: source, nsamples, seqlen"),
        ("prepare.nsampels=3", "prepare.nsampels: unknown key (allowed: source, nsamples"),
        ("prepare.nsampels=3", "did you mean 'nsamples'?"),
        ("budgets=[2]", "budgets: 2.0 is not in [0, 1)"),
    ],
    ids=["no-equals", "unknown-key", "typo-key", "typo-hint", "budget"],
)
def test_bad_set_override_fails_before_any_work(proj, capsys, override, match):
    code, _, err = cli(capsys, "run", "--params", proj / "params.yaml", "--set", override)
    assert code == 2
    assert match in error_line(err)
    assert not (proj / "out").exists()


@pytest.mark.parametrize(
    "method,match",
    [
        ("cfsp+foo=1", "method 'cfsp+foo=1' at budget 0.3: foo: unknown key (allowed: "),
        ("cfsp+tempreature=2", "did you mean 'temperature'?"),
        ("cfsp+criterion=magic", "criterion: Input should be 'cfsp', 'act_norm'"),
        ("sparsegpt", "unknown method 'sparsegpt'; choose one of cfsp"),
        ("cfsp+oops", "method variant 'cfsp+oops': expected PRESET[+key=value...]"),
    ],
    ids=["unknown-key", "typo-hint", "criterion", "method", "syntax"],
)
def test_bad_method_variant_in_a_stage(proj, tmp_path, capsys, method, match):
    out = tmp_path / "allocation"
    code, _, err = cli(
        capsys,
        "stage",
        "allocate",
        "--model",
        proj / "tiny",
        "--stats",
        tmp_path / "stats",
        "--tokens",
        tmp_path / "tokens",
        "--out",
        out,
        "--budget",
        "0.3",
        "--method",
        method,
        "--params",
        proj / "params.yaml",
    )
    assert code == 2
    assert match in error_line(err)
    assert not out.exists()


def test_missing_truncated_and_tampered_stage_artifacts(proj, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    params = ("--params", proj / "params.yaml")
    model = ("--model", proj / "tiny")
    prep, cap, alloc = tmp_path / "prep", tmp_path / "cap", tmp_path / "alloc"
    assert cli(capsys, "stage", "prepare", *model, "--out", prep, *params)[0] == 0
    assert cli(capsys, "stage", "capture", *model, "--tokens", prep, "--out", cap, *params)[0] == 0
    done = snapshot(cap)

    def capture_from(tokens):
        return cli(capsys, "stage", "capture", *model, "--tokens", tokens, "--out", cap, *params)

    code, _, err = capture_from(tmp_path / "nowhere")
    assert code == 2 and "do not exist; run the prepare stage first" in error_line(err)

    truncated = tmp_path / "truncated.safetensors"
    data = (prep / "tokens.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    code, _, err = capture_from(truncated)
    assert code == 1 and "corrupt safetensors file" in error_line(err)

    with safe_open(str(prep / "tokens.safetensors"), "pt") as handle:
        ids, meta = handle.get_tensor("ids"), handle.metadata()
    tampered = tmp_path / "tampered.safetensors"
    save_file({"ids": (ids + 1) % 128}, str(tampered), metadata=meta)
    code, _, err = capture_from(tampered)
    assert code == 1 and "token ids do not match their recorded hash" in error_line(err)
    assert snapshot(cap) == done  # the finished capture survived three failed reruns

    stats = tmp_path / "truncated-stats.safetensors"
    data = (cap / "moments.safetensors").read_bytes()
    stats.write_bytes(data[: len(data) // 2])
    code, _, err = cli(
        capsys,
        "stage",
        "allocate",
        *model,
        "--stats",
        stats,
        "--tokens",
        prep,
        "--out",
        alloc,
        "--budget",
        "0.3",
        "--method",
        "cfsp",
        *params,
    )
    assert code == 1 and "corrupt safetensors file" in error_line(err)
    assert not alloc.exists() and hidden(tmp_path) == []


# -- models and weights ---------------------------------------------------------------------------
def _eval(capsys, model, proj, out, *extra):
    text = f"file:{proj / 'text.txt'}"
    return cli(
        capsys, "eval", "--model", model, "--data", text, "--seqlen", "16", "--out", out, *extra
    )


@pytest.mark.parametrize(
    "damage,code,match",
    [
        ("no-weights", 2, "holds no .safetensors weights"),
        ("pickle-only", 2, "(found pytorch_model.bin: pickle files are never loaded)"),
        ("truncated", 1, "corrupt safetensors file"),
        ("garbage", 1, "corrupt safetensors file"),
        ("no-config", 2, "has no config.json: not a Hugging Face model directory"),
        ("a-file", 2, "is a file; give a model directory, a .gguf file or a hub id"),
    ],
    ids=["no-weights", "pickle-only", "truncated", "garbage", "no-config", "a-file"],
)
def test_damaged_model_directories(proj, tmp_path, capsys, damage, code, match):
    model = tmp_path / "model"
    shutil.copytree(proj / "tiny", model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    if damage == "no-weights":
        weights.unlink()
    elif damage == "pickle-only":
        weights.rename(model / "pytorch_model.bin")
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "no-config":
        (model / "config.json").unlink()
    else:
        model = weights
    result = tmp_path / "result.json"
    result.write_text('{"previous": true}\n')
    got, _, err = _eval(capsys, model, proj, result)
    assert got == code
    assert match in error_line(err)
    assert result.read_text() == '{"previous": true}\n' and hidden(tmp_path) == []


def test_remote_code_is_off_by_default(proj, tmp_path, capsys):
    from safetensors.torch import save_file

    model = tmp_path / "custom"
    model.mkdir()
    config = {
        "model_type": "cfsp-test-custom",
        "architectures": ["CustomForCausalLM"],
        "auto_map": {
            "AutoConfig": "custom.CustomConfig",
            "AutoModelForCausalLM": "custom.CustomForCausalLM",
        },
    }
    (model / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "code-ran"
    (model / "custom.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    save_file({"x": torch.zeros(2)}, str(model / "model.safetensors"))
    code, _, err = _eval(capsys, model, proj, tmp_path / "result.json")
    assert code == 2
    line = error_line(err)
    assert "ships its own modeling code" in line and "unless you pass --trust-remote-code" in line
    assert not ran.exists() and not (tmp_path / "result.json").exists()


def test_text_too_short_or_empty_for_evaluation(proj, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = tmp_path / "result.json"
    code, _, err = cli(
        capsys, "eval", "--model", proj / "tiny", "--data", f"file:{empty}", "--out", result
    )
    assert code == 2 and "has 0 tokens, fewer than one window of 128" in error_line(err)
    code, _, err = _eval(capsys, proj / "tiny", proj, result, "--seqlen", "1000")
    assert code == 2 and "seqlen 1000 exceeds the model's context (256 tokens)" in error_line(err)
    assert not result.exists() and hidden(tmp_path) == []


def test_non_finite_activations_leave_the_checkpoint_alone(proj, ckpt, tmp_path, capsys):
    model = tiny_model("llama-gqa")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(proj / "tiny" / name, tmp_path / "broken" / name)
    before = snapshot(ckpt)
    args = prune_args(proj, ckpt, "--overwrite")
    args[args.index("--model") + 1] = tmp_path / "broken"
    code, _, err = cli(capsys, *args)
    assert code == 1
    assert "non-finite activations during calibration (NaN/inf)" in error_line(err)
    assert snapshot(ckpt) == before and hidden(tmp_path) == []


# -- outputs --------------------------------------------------------------------------------------
def test_output_that_is_not_a_checkpoint(proj, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine\n")
    code, _, err = cli(capsys, *prune_args(proj, notes))
    assert code == 2
    assert "exists and is not a cfsp checkpoint; choose another --out" in error_line(err)
    assert snapshot(notes) == {"todo.txt": b"mine\n"}
    plain = tmp_path / "plainfile"
    plain.write_text("data\n")
    code, _, err = cli(capsys, *prune_args(proj, plain, "--overwrite"))
    assert code == 2 and "exists and is not a directory" in error_line(err)
    assert plain.read_text() == "data\n" and hidden(tmp_path) == []


def test_full_disk_keeps_the_previous_checkpoint(proj, ckpt, capsys, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    from cfsp.engine import streamed_weights

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)  # the in-memory engine
    monkeypatch.setattr(streamed_weights, "save_safetensors", full_disk)  # the streamed one
    before = snapshot(ckpt)
    code, _, err = cli(capsys, *prune_args(proj, ckpt, "--budget", "0.5", "--overwrite"))
    assert code == 1
    line = error_line(err)
    assert f"could not write {ckpt}" in line and "No space left on device" in line
    assert snapshot(ckpt) == before and hidden(ckpt.parent) == []


def test_full_disk_while_writing_a_file(tmp_path, monkeypatch):
    from cfsp.errors import CfspError
    from cfsp.io import write_json

    target = tmp_path / "metrics.json"
    write_json(target, {"ppl": 1.0})
    before = target.read_bytes()
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(CfspError, match="could not write .*No space left on device"):
        write_json(target, {"ppl": 2.0})
    monkeypatch.undo()
    assert target.read_bytes() == before and hidden(tmp_path) == []


# -- servers --------------------------------------------------------------------------------------
def test_prefect_server_that_does_not_start(proj, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1",  # it cannot come up in 1 s
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cfsp.cli", "run", "--params", str(proj / "params.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = error_line(proc.stderr)
    assert "Prefect is not available: Timed out while attempting to connect" in line
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line
    assert not (proj / "out").exists()


# -- guarantees -----------------------------------------------------------------------------------
def test_same_request_gives_bit_identical_weights_and_verify_catches_one_flipped_byte(
    proj, tmp_path, capsys
):
    digests = []
    for name in ("first", "second"):
        out = tmp_path / name
        code, _, err = cli(capsys, *prune_args(proj, out, "--budget", "0.4", "--seed", "3"))
        assert code == 0, err
        manifest = json.loads((out / "cfsp_manifest.json").read_text())
        digest = sha256_file(out / "model.safetensors")
        assert manifest["weights_sha256"] == {"model.safetensors": digest}
        digests.append(digest)
    assert digests[0] == digests[1]

    out = tmp_path / "first"
    code, stdout, _ = cli(capsys, "verify", out)
    assert code == 0 and "weights match the manifest" in stdout
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    code, _, err = cli(capsys, "verify", out)
    line = error_line(err)
    assert code == 1 and "does not match its manifest: model.safetensors: sha256" in line

    shutil.copy(
        tmp_path / "second" / "model.safetensors", tmp_path / "second" / "extra.safetensors"
    )
    code, _, err = cli(capsys, "verify", tmp_path / "second")
    assert code == 1 and "extra.safetensors: not recorded in the manifest" in error_line(err)
    code, _, err = cli(capsys, "verify", proj / "tiny")  # a dense model has no manifest
    assert code == 2 and "cfsp_manifest.json does not exist" in error_line(err)


def _write_artifact(dest: str, tag: int, rounds: int, barrier=None) -> list[str]:
    """Publish `rounds` versions of one artifact; returns the errors met."""
    import hashlib

    from cfsp.errors import CfspError
    from cfsp.io import atomic_dir

    if barrier is not None:
        barrier.wait()
    errors = []
    for i in range(rounds):
        payload = os.urandom(1 << 15)
        try:
            with atomic_dir(dest) as tmp:
                (tmp / "payload.bin").write_bytes(payload)
                digest = hashlib.sha256(payload).hexdigest()
                (tmp / "manifest.json").write_text(json.dumps({"sha256": digest, "by": [tag, i]}))
        except CfspError as err:
            errors.append(str(err))
    return errors


def _process_writer(dest: str, tag: int, rounds: int) -> None:
    sys.exit(1 if _write_artifact(dest, tag, rounds) else 0)


def _check_one_complete_artifact(root: Path) -> None:
    dest = root / "artifact"
    assert sorted(p.name for p in root.iterdir()) == ["artifact"]  # no temporary names left
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "payload.bin"]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert sha256_file(dest / "payload.bin") == manifest["sha256"]


def test_concurrent_writers_of_one_artifact(tmp_path):
    threads_root = tmp_path / "threads"
    threads_root.mkdir()
    dest = str(threads_root / "artifact")
    barrier = threading.Barrier(4)
    errors: list[str] = []

    def worker(tag):
        errors.extend(_write_artifact(dest, tag, 25, barrier))

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _check_one_complete_artifact(threads_root)

    procs_root = tmp_path / "processes"
    procs_root.mkdir()
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_process_writer, args=(str(procs_root / "artifact"), tag, 25))
        for tag in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    _check_one_complete_artifact(procs_root)
