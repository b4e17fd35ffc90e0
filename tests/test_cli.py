"""The command line as a user meets it: one clear line and a non-zero exit on bad input."""

import json
import os

import pytest

from tests.conftest import run_cli as cfsp
from tests.conftest import tiny_model


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_help_explains_itself():
    code, out, _ = cfsp("--help")
    assert code == 0
    for word in ("prune", "eval", "smollm2-135m", "botchan"):
        assert word in out
    code, out, _ = cfsp("prune", "--help")
    assert code == 0 and "--budget" in out and "decoder-block weight parameters" in out


@pytest.mark.parametrize(
    "args,match",
    [
        (["prune", "--budget", "1.5"], "budget: Input should be less than 1"),
        (["prune", "--budget", "-0.1"], "budget"),
        (["prune", "--method", "sparsegpt"], "unknown method 'sparsegpt'"),
        (["prune", "--reconstruct", "magic"], "reconstruct"),
        (["eval", "--model", "/nonexistent/model"], "not found"),
        (["eval", "--model", "./nowhere"], "not found"),
    ],
)
def test_usage_errors_exit_2(args, match):
    code, _, err = cfsp(*args)
    assert code == 2
    assert match in _error_line(err)


def test_non_numeric_budget_is_a_usage_error():
    code, _, err = cfsp("prune", "--budget", "half")
    assert code == 2 and "--budget" in err and "valid number" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args,match",
    [
        (["prune", "--budget", "half"], "(see `cfsp prune --help`)"),
        (["prune", "--bogus"], "No such option: --bogus"),
        (["stage", "prune", "--budget", "x"], "(see `cfsp stage prune --help`)"),
        (["verify"], "Missing argument 'directory'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_click_usage_errors_are_one_error_line(args, match):
    """Click's own usage errors print one `error:` line, no usage box, and exit 2."""
    code, out, err = cfsp(*args)
    assert code == 2 and out == ""
    assert err.strip() == _error_line(err) and match in err


def test_bare_group_prints_its_help():
    code, _, err = cfsp("stage")
    assert code == 2 and "prepare" in err and "error:" not in err


def test_debug_shows_traceback():
    code, _, err = cfsp("--debug", "eval", "--model", "/nonexistent/model")
    assert code != 0 and "Traceback" in err


def test_eval_and_prune_on_a_local_model(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "tiny"
    model = tiny_model("llama-gqa")
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog ran after it. " * 60)
    out = tmp_path / "ppl.json"
    code, stdout, err = cfsp(
        "eval",
        "--model",
        str(model_dir),
        "--data",
        f"file:{text}",
        "--seqlen",
        "16",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "ppl=" in stdout and out.is_file()

    pruned = tmp_path / "pruned"
    code, stdout, err = cfsp(
        "prune",
        "--model",
        str(model_dir),
        "--budget",
        "0.3",
        "--calib",
        f"file:{text}",
        "--nsamples",
        "8",
        "--seqlen",
        "16",
        "--control",
        "0.5",
        "--damping",
        "0.1",
        "--out",
        str(pruned),
    )
    assert code == 0, err
    assert (pruned / "cfsp_manifest.json").is_file() and (pruned / "model.safetensors").is_file()
    saved = json.loads((pruned / "cfsp_manifest.json").read_text())["prune"]["config"]
    assert saved["control"] == 0.5 and saved["damping"] == 0.1
    # Too little text: a clear error, and the existing output is left untouched.
    before = (pruned / "model.safetensors").read_bytes()
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat")
    code, _, err = cfsp(
        "prune",
        "--model",
        str(model_dir),
        "--calib",
        f"file:{short}",
        "--seqlen",
        "64",
        "--out",
        str(pruned),
        "--overwrite",  # the too-short text is reported even when replacing is allowed
    )
    assert code == 2 and "too few" in _error_line(err)
    assert (pruned / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_unwritable_output(tmp_path, tiny_tokenizer):
    if os.geteuid() == 0:
        target = "/proc/cfsp-out"  # not writable even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "out")
    code, _, err = cfsp("prune", "--model", "/nonexistent", "--out", target)
    assert code == 2 and "not writable" in _error_line(err)


def test_guarded_output_and_verify(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "tiny"
    tiny_model("llama-gqa").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog ran after it. " * 60)
    out = tmp_path / "pruned"
    base = (
        "prune",
        "--model",
        str(model_dir),
        "--calib",
        f"file:{text}",
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--out",
        str(out),
    )
    assert cfsp(*base, "--budget", "0.3")[0] == 0
    first = (out / "model.safetensors").read_bytes()
    assert cfsp("verify", str(out))[0] == 0
    # The same request again is a rerun and gives bit-identical weights.
    assert cfsp(*base, "--budget", "0.3")[0] == 0
    assert (out / "model.safetensors").read_bytes() == first
    # A different request must not silently replace it.
    code, _, err = cfsp(*base, "--budget", "0.5")
    assert code == 2 and "already holds a different run" in _error_line(err)
    assert (out / "model.safetensors").read_bytes() == first
    assert cfsp(*base, "--budget", "0.5", "--overwrite")[0] == 0
    # Tampered weights are caught.
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = cfsp("verify", str(out))
    assert code == 1 and "does not match its manifest" in _error_line(err)


def test_logging_follows_stderr_after_it_is_swapped(monkeypatch, capsys):
    """An in-process caller that swaps and closes stderr must not break later log calls
    (this broke Prefect's flow logging after in-process CLI tests)."""
    import io
    import logging

    from cfsp.logs import setup_logging

    temporary = io.StringIO()
    monkeypatch.setattr("sys.stderr", temporary)
    setup_logging()
    temporary.close()
    monkeypatch.undo()
    logging.getLogger("cfsp.test").info("still logging")
    err = capsys.readouterr().err
    assert "INFO still logging" in err and "Logging error" not in err
