"""Zero-shot evaluation through lm-eval on the local data files (cfsp.evaluation.zeroshot)."""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model

from cfsp.data import local_data_dir
from cfsp.errors import UsageError
from cfsp.evaluation.zeroshot import export_tasks, zeroshot

DATA = local_data_dir()
needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "piqa/dev.jsonl").is_file(),
    reason="no local zero-shot data (set CFSP_DATA_DIR)",
)
COUNTS = {
    "cfsp_piqa": 1838,
    "cfsp_arc_easy": 2376,
    "cfsp_boolq": 3270,
    "cfsp_winogrande": 1267,
    "cfsp_hellaswag": 10042,
}


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _docs(folder: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in _lines(folder / f"{task}.jsonl")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_tasks(tmp_path_factory.mktemp("zs") / "tasks")


@pytest.fixture
def model():
    m = tiny_model("llama-gqa")
    # Rotary positions need no table: a longer limit keeps lm-eval from left-truncating.
    m.config.max_position_embeddings = 4096
    return m


# -- names and errors (no data needed) ---------------------------------------------------------
def test_unknown_task_names_the_known_ones(tmp_path, tiny_tokenizer):
    with pytest.raises(UsageError, match="known: piqa, arc_easy"):
        zeroshot(tiny_model("llama-gqa"), tiny_tokenizer, ["piqa", "mmlu"], limit=2)
    with pytest.raises(UsageError, match="limit"):
        zeroshot(tiny_model("llama-gqa"), tiny_tokenizer, ["piqa"], limit=0)


def test_missing_data_says_cfsp_data_dir(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="CFSP_DATA_DIR"):
        export_tasks(tmp_path / "out", data_dir=tmp_path)
    monkeypatch.setenv("CFSP_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="CFSP_DATA_DIR"):
        export_tasks(tmp_path / "out", tasks=["boolq"])
    assert not (tmp_path / "out").exists()


def test_extra_arc_file_with_numeric_labels(tmp_path):
    rows = [
        {
            "id": f"q{i}",
            "question": {
                "stem": f"Question number {i}?",
                "choices": [{"text": t, "label": str(k + 1)} for k, t in enumerate("wxyz")],
            },
            "answerKey": str(i % 4 + 1),
        }
        for i in range(6)
    ]
    src = tmp_path / "obqa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = export_tasks(tmp_path / "out", extra_arc={"obqa": src}, tasks=["obqa"])
    docs = _docs(out, "cfsp_obqa")
    assert [d["label"] for d in docs] == [i % 4 for i in range(6)]
    assert docs[0]["choices"] == {"text": list("wxyz"), "label": ["1", "2", "3", "4"]}
    config = yaml.safe_load((out / "cfsp_obqa.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"] == {"test": str(out / "cfsp_obqa.jsonl")}
    # A second export replaces the first; a folder that is not an export is never replaced.
    export_tasks(out, extra_arc={"obqa": src}, tasks=["obqa"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="refusing"):
        export_tasks(tmp_path / "mine", extra_arc={"obqa": src}, tasks=["obqa"])
    assert (tmp_path / "mine/notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "obqa.jsonl", "out"]


# -- export ------------------------------------------------------------------------------------
@needs_data
def test_export_counts_yaml_and_labels(exported):
    for task, count in COUNTS.items():
        config = yaml.safe_load((exported / f"{task}.yaml").read_text())
        assert config["task"] == task and config["dataset_path"] == "json"
        (path,) = config["dataset_kwargs"]["data_files"].values()
        assert Path(path).is_absolute() and Path(path) == exported / f"{task}.jsonl"
        assert len(_docs(exported, task)) == count
    piqa, labels = _docs(exported, "cfsp_piqa"), _lines(DATA / "piqa/dev-labels.lst")
    for i in (0, 1, 917, 1837):
        assert piqa[i]["label"] == int(labels[i])
    boolq = _lines(DATA / "boolq/val.jsonl")
    for i, doc in enumerate(_docs(exported, "cfsp_boolq")[:40]):
        assert doc["label"] == {"false": 0, "true": 1}[json.loads(boolq[i])["label"]]
    wino = _docs(exported, "cfsp_winogrande")
    assert [d["label"] for d in wino[:2]] == [1, 0]  # answers "2", "1"
    assert wino[0]["contexts"][1] == "Sarah was a much better surgeon than Maria so Maria"
    assert wino[0]["continuation"] == "always got the easier cases."
    arc = _docs(exported, "cfsp_arc_easy")
    for i, line in enumerate(_lines(DATA / "arc/ARC-Easy-Test.jsonl")[:200]):
        row = json.loads(line)
        keys = [c["label"] for c in row["question"]["choices"]]
        assert arc[i]["label"] == keys.index(row["answerKey"])
        assert arc[i]["question"] == row["question"]["stem"]
    with bz2.open(DATA / "hellaswag/hellaswag_val_full.txt.bz2", "rt") as f:
        head = [next(f).rstrip("\n") for _ in range(12)]
    hs = _docs(exported, "cfsp_hellaswag")
    assert [hs[0]["label"], hs[1]["label"]] == [int(head[1]), int(head[7])]
    assert hs[0]["query"] == head[0] and hs[1]["choices"] == head[8:12]


@needs_data
def test_lm_eval_builds_the_standard_prompts(exported):
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(exported), include_defaults=False)
    tasks = get_task_dict(["cfsp_piqa", "cfsp_arc_easy", "cfsp_boolq", "cfsp_winogrande"], manager)
    piqa = tasks["cfsp_piqa"].eval_docs[0]
    assert tasks["cfsp_piqa"].doc_to_text(piqa) == f"Question: {piqa['goal']}\nAnswer:"
    assert tasks["cfsp_piqa"].doc_to_choice(piqa) == [piqa["sol1"], piqa["sol2"]]
    arc = tasks["cfsp_arc_easy"]
    assert arc.doc_to_target(arc.eval_docs[0]) == 0  # answerKey "A"
    boolq = tasks["cfsp_boolq"]
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_text(doc).endswith(f"\nQuestion: {doc['question']}?\nAnswer:")
    assert boolq.doc_to_choice(doc) == ["no", "yes"]
    wino = tasks["cfsp_winogrande"]
    assert wino.multiple_input == 2  # partial evaluation: one context per option
    assert wino.doc_to_text(wino.eval_docs[0]) == 1


# -- evaluation --------------------------------------------------------------------------------
@needs_data
def test_zeroshot_runs_offline_on_a_tiny_model(model, tiny_tokenizer, monkeypatch):
    """With every outgoing connection refused and no HF_*_OFFLINE set by cfsp, it still runs:
    nothing reaches for the hub, so no thread needs to change the process environment."""
    import os
    import socket

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test: network refused ({address})")
        return real_connect(sock, address)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    environ = {k: os.environ.get(k) for k in keys}
    out = zeroshot(model, tiny_tokenizer, ["piqa", "cfsp_winogrande", "hellaswag"], limit=5)
    assert out["limit"] == 5 and out["lm_eval_version"]
    assert set(out["tasks"]) == {"piqa", "winogrande", "hellaswag"}
    for name, row in out["tasks"].items():
        assert row["items"] == 5 and 0.0 <= row["acc"] <= 1.0
        assert ("acc_norm" in row) == (name != "winogrande")
    mean = sum(r["acc"] for r in out["tasks"].values()) / 3
    assert out["average_acc"] == pytest.approx(mean)
    assert {k: os.environ.get(k) for k in keys} == environ  # (lm-eval's imports set others)


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context): encode the whole, split at the context."""
    whole = tok.encode(context + continuation, add_special_tokens=False)
    n_ctx = len(tok.encode(context, add_special_tokens=False))
    assert whole[:n_ctx] == tok.encode(context, add_special_tokens=False)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, n_ctx:]
    return logp[n_ctx - 1 :].gather(1, targets[:, None]).sum().item()


@needs_data
def test_lm_eval_acc_equals_an_independent_scorer(model, tiny_tokenizer):
    n = 50
    rows = [json.loads(line) for line in _lines(DATA / "arc/ARC-Easy-Test.jsonl")[:n]]
    mine, picks, correct = [], [], 0
    for row in rows:
        context = f"Question: {row['question']['stem']}\nAnswer:"
        choices = row["question"]["choices"]
        scores = [_loglikelihood(model, tiny_tokenizer, context, " " + c["text"]) for c in choices]
        best = max(range(len(scores)), key=scores.__getitem__)
        mine.append(scores)
        picks.append(best)
        correct += choices[best]["label"] == row["answerKey"]
    out = zeroshot(model, tiny_tokenizer, ["arc_easy"], limit=n, batch_size=16, per_item=True)
    arc = out["tasks"]["arc_easy"]
    assert arc["items"] == n
    theirs = arc["loglikelihoods"]
    assert [max(range(len(s)), key=s.__getitem__) for s in theirs] == picks
    for a, b in zip(theirs, mine, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-3)
    assert arc["acc"] == correct / n
    assert 0 < correct < n  # not a degenerate agreement


def test_no_request_bar_off_a_terminal(model, tiny_tokenizer, capfd):
    """stderr is not a terminal under pytest: lm-eval's request bar prints nothing there (the
    datasets library's own bars are switched off by the CLI, cfsp.logs, not by zeroshot)."""
    zeroshot(model, tiny_tokenizer, ["piqa"], limit=3)
    # The bar draws "Running loglikelihood requests:  33%|..."; lm-eval's log line of the same
    # words (when a test before set up logging) is no bar.
    assert not re.search(r"loglikelihood requests: +\d+%", capfd.readouterr().err)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3-kv1", "phi3-gqa"])
def test_continuation_scoring_equals_lm_eval(name, tiny_tokenizer):
    """ContinuationHFLM computes the head on the continuation positions only; its answers equal
    stock HFLM's, with batches of mixed lengths and contexts left-truncated at max_length."""
    from lm_eval.models.huggingface import HFLM

    from cfsp.evaluation.zeroshot_lm import ContinuationHFLM

    model = tiny_model(name)
    gen = torch.Generator().manual_seed(0)
    requests = []
    for n_ctx, n_cont in [(3, 1), (12, 5), (7, 2), (30, 4), (1, 9), (20, 20), (5, 3)]:
        ids = torch.randint(3, 128, (n_ctx + n_cont,), generator=gen).tolist()
        requests.append(((f"c{n_ctx}", f"x{n_cont}"), ids[:n_ctx], ids[n_ctx:]))
    for batch in (1, 3):
        for max_length in (256, 24):  # 24: the longest requests lose context on the left
            ours = ContinuationHFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=batch)
            stock = HFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=batch)
            ours._max_length = stock._max_length = max_length
            got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
            want = stock._loglikelihood_tokens(requests, disable_tqdm=True)
            assert [g for _, g in got] == [w for _, w in want]
            assert [s for s, _ in got] == pytest.approx([s for s, _ in want], rel=1e-5, abs=1e-4)
    assert len({round(s, 3) for s, _ in got}) == len(requests)  # not one repeated value


def test_continuation_scoring_asks_for_the_continuation_logits_only(tiny_tokenizer):
    from cfsp.evaluation.zeroshot_lm import ContinuationHFLM

    model = tiny_model("llama-gqa")
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    lm = ContinuationHFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=2)
    requests = [(None, list(range(3, 40)), [5, 6]), (None, list(range(3, 38)), [7, 8, 9])]
    lm._loglikelihood_tokens(requests, disable_tqdm=True)
    # inputs 38 and 37 tokens long; continuations start at 36 and 34: the head sees 34..37
    assert rows == [(2, 4, 48)]
