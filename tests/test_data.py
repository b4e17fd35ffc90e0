import json

import pytest
import torch

from cfsp.data import calibration_windows, evaluation_windows, load_text
from cfsp.errors import UsageError
from tests.conftest import SHARED_DATA, tiny_model

TEXT = "the cat sat on the mat and the dog ran after it. " * 40


@pytest.fixture
def txt(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    return f"file:{path}"


def test_file_formats_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first document here", "second one"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    a = load_text(f"file:{tmp_path / 'a.jsonl'}")
    b = load_text(f"file:{tmp_path / 'a.parquet'}")
    assert a.text == b.text == "first document here\n\nsecond one"


def test_calibration_is_seeded(txt, tiny_tokenizer):
    a = calibration_windows(txt, tiny_tokenizer, 5, 16, seed=1)
    b = calibration_windows(txt, tiny_tokenizer, 5, 16, seed=1)
    c = calibration_windows(txt, tiny_tokenizer, 5, 16, seed=2)
    assert a.ids.shape == (5, 16)
    assert torch.equal(a.ids, b.ids) and a.hash == b.hash
    assert not torch.equal(a.ids, c.ids) and a.hash != c.hash
    assert a.fingerprint["seed"] == 1 and a.fingerprint["count"] == 5
    assert a.fingerprint["text_sha256"] and a.fingerprint["tokenizer"]


def test_evaluation_windows_are_consecutive(txt, tiny_tokenizer):
    full = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    win = evaluation_windows(txt, tiny_tokenizer, 10, limit=3)
    assert win.ids.shape == (3, 10)
    assert win.ids.flatten().tolist() == full[:30]
    assert win.fingerprint["available"] == len(full) // 10


def test_special_token_spellings_in_text_stay_text(tmp_path, tiny_tokenizer):
    # WikiText's tokenised files write "<unk>" for rare words; Gemma 3's tokenizer would turn
    # that spelling into its UNK id, which the model never saw in training. Here: "<s>" / "</s>"
    # (this tokenizer's BOS / EOS) written in the text must not become BOS / EOS ids.
    text = "the cat sat </s> on the mat <s> and ran . " * 20
    path = tmp_path / "wiki.txt"
    path.write_text(text)
    win = evaluation_windows(f"file:{path}", tiny_tokenizer, 10, limit=8)
    marks = {tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id}
    assert not marks & set(win.ids.flatten().tolist())
    plain = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert marks <= set(plain)  # what parsing the spellings as special tokens would give


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(nsamples=4, seqlen=0), "seqlen"),
        (dict(nsamples=0, seqlen=8), "positive"),
        (dict(nsamples=4, seqlen=100000), "too few"),
    ],
)
def test_bad_window_requests(txt, tiny_tokenizer, kwargs, match):
    with pytest.raises(UsageError, match=match):
        calibration_windows(txt, tiny_tokenizer, seed=0, **kwargs)


def test_seqlen_beyond_model_context(txt, tiny_tokenizer):
    model = tiny_model("llama-gqa")  # max_position_embeddings = 256
    with pytest.raises(UsageError, match="exceeds the model's context"):
        calibration_windows(txt, tiny_tokenizer, 2, 512, 0, model)


def test_empty_and_missing_sources(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UsageError, match="fewer than one window"):
        evaluation_windows(f"file:{empty}", tiny_tokenizer, 8)
    with pytest.raises(UsageError, match="does not exist"):
        load_text(f"file:{tmp_path / 'nope.txt'}")
    with pytest.raises(UsageError, match="unknown text source"):
        load_text("wikitext3")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(UsageError, match="'text' field"):
        load_text(f"file:{bad}")


def test_self_generated_calibration(tiny_tokenizer):
    model = tiny_model("llama-gqa")
    a = calibration_windows("self", tiny_tokenizer, 3, 12, seed=0, model=model)
    b = calibration_windows("self", tiny_tokenizer, 3, 12, seed=0, model=model)
    assert a.ids.shape == (3, 12)
    assert torch.equal(a.ids, b.ids)
    assert a.fingerprint["origin"] == "self"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_local_wikitext_and_c4(monkeypatch):
    monkeypatch.setenv("CFSP_DATA_DIR", str(SHARED_DATA))
    wiki = load_text("wikitext2")
    assert wiki.origin.endswith("wiki.test.raw")
    assert wiki.text.startswith("\n\n = Robert Boulter = \n\n")
    c4 = load_text("c4")
    assert c4.text.count("\n\n") >= 1999
    with pytest.raises(UsageError, match="ptb needs the hub"):
        load_text("ptb")


def test_windows_start_with_bos_where_the_tokenizer_adds_one(txt, tiny_tokenizer):
    """BOS + (seqlen - 1) text tokens for tokenizers that put BOS before text; others as is."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from cfsp.data import leading_bos

    with_bos = copy.deepcopy(tiny_tokenizer)
    bos = with_bos.bos_token_id
    template = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    with_bos._tokenizer.post_processor = template
    assert leading_bos(tiny_tokenizer) is None and leading_bos(with_bos) == bos
    plain = evaluation_windows(txt, tiny_tokenizer, 10)
    ev = evaluation_windows(txt, with_bos, 10)
    assert (ev.ids[:, 0] == bos).all() and ev.fingerprint["bos"] == bos
    assert "bos" not in plain.fingerprint
    # Against the whole token stream, not `plain`'s windows: the tiny tokenizer's BPE training
    # differs from process to process, and 10-token windows can cover fewer tokens than 9-token
    # bodies (N = 1049: 1040 vs 1044), which made this comparison fail now and then.
    full = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    body = ev.ids[:, 1:].flatten().tolist()
    assert body == full[: len(body)] and len(body) == len(full) // 9 * 9
    cal = calibration_windows(txt, with_bos, 5, 10, seed=1)
    assert cal.ids.shape == (5, 10) and (cal.ids[:, 0] == bos).all()
