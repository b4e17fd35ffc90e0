"""Text sources -> token windows with a fingerprint.

Source specs (one string everywhere):
  botchan[:PART]          the Botchan novel from the sentencepiece sdist (no hub needed); PART
                          `train` = its first 80% of lines, `test` = the remaining 20%: the
                          main job calibrates on one and evaluates on the other (disjoint)
  self                    text sampled from the model itself, seeded (calibration only)
  file:PATH               .txt/.raw (whole file), .jsonl (field "text"), .parquet (column "text")
  hf:NAME[:CONFIG[:SPLIT]]  any hub dataset with a text column (split defaults to "test")
  wikitext2[:SPLIT], c4, ptb[:SPLIT]
                          the usual pruning corpora: from the hub when it is reachable, else from
                          the local data directory named by CFSP_DATA_DIR (never guessed;
                          layout in SOURCES.md of this team's data folder)

Calibration takes N windows of L tokens at seeded random offsets of the tokenized text;
evaluation takes consecutive non-overlapping windows, optionally only the first K.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cfsp.errors import CfspError, UsageError
from cfsp.io import check_regular_file, sha256_text

ALIASES = ("botchan", "self", "wikitext2", "c4", "ptb")
BOTCHAN_PARTS = ("train", "test")
BOTCHAN_TRAIN_FRACTION = 0.8  # of the novel's lines; `botchan:test` is the rest
# Local copies of the hub corpora, relative to CFSP_DATA_DIR: (alias, split) -> file.
LOCAL_COPIES = {
    ("wikitext2", "test"): "wikitext2/wiki.test.raw",
    ("wikitext2", "valid"): "wikitext2/tokens/valid.txt",
    ("wikitext2", "validation"): "wikitext2/tokens/valid.txt",
    ("c4", "validation"): "c4/c4_validation_2k.jsonl",
}
DEFAULT_SPLIT = {"wikitext2": "test", "c4": "validation", "ptb": "test"}
PURPOSES = ("calibration", "evaluation", "training")


@dataclass
class Text:
    text: str
    source: str  # the spec as given
    origin: str  # where it came from: a path, or hub:name/config@split

    @property
    def sha256(self) -> str:
        return sha256_text(self.text)


@dataclass
class TokenWindows:
    """Token ids [count, seqlen] and a fingerprint that identifies them."""

    ids: torch.Tensor
    fingerprint: dict = field(default_factory=dict)
    # Windows of the same source kept out of the statistics, for choices made inside a run
    # (`control: auto`); None when none were drawn.
    heldout: torch.Tensor | None = None

    @property
    def hash(self) -> str:
        return self.fingerprint["hash"]


# -- where text comes from ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def local_data_dir() -> Path | None:
    """The folder of local corpus copies: CFSP_DATA_DIR, or None. Never guessed from where the
    package or the working directory happens to be: a run's data is what its user named."""
    env = os.environ.get("CFSP_DATA_DIR")
    if not env:
        return None
    root = Path(env).expanduser()
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise UsageError(f"CFSP_DATA_DIR={env} {state}; point it at the local data folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UsageError(f"CFSP_DATA_DIR={env} cannot be read")
    return root


def _read_file(path: Path) -> str:
    check_regular_file(path, "text file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = [(n, json.loads(line)) for n, line in enumerate(lines, 1) if line.strip()]
            return "\n\n".join(_row_text(path, n, row) for n, row in rows)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
            return "\n\n".join(_row_text(path, n, {"text": v}) for n, v in enumerate(values, 1))
        return path.read_text(encoding="utf-8")
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{path}: expected one JSON object with a 'text' field per line ({err})"
        ) from err
    except UsageError:
        raise
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text") from err
    except Exception as err:  # pyarrow raises its own types for a bad parquet
        raise UsageError(f"cannot read {path}: {err}") from err


def _row_text(path: Path, row_number: int, row) -> str:
    """The text of one JSONL / parquet row; a missing, null or non-string text is an error,
    never the string "None" or "123" silently calibrated on."""
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        got = (
            "no 'text' field"
            if not isinstance(row, dict) or "text" not in row
            else ("text null" if text is None else f"text of type {type(text).__name__}")
        )
        raise UsageError(f"{path}: row {row_number} has {got}; every row needs a string 'text'")
    return text


def _wikitext_rows_text(lines: list[str]) -> str:
    """The usual LLM-pruning recipe: "\\n\\n".join(rows), whitespace-only rows as ""."""
    return "\n\n".join("" if not line.strip() else line for line in lines)


def _from_hub(name: str, config: str | None, split: str, column: str | None = None) -> str:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        raise CfspError(f"cannot load hub dataset {name}:{config}:{split}: {err}") from err
    column = column or next(
        (c for c in ("text", "sentence", "content") if c in ds.column_names), None
    )
    if column is None:
        raise UsageError(f"hub dataset {name} has no text column (columns: {ds.column_names})")
    return "\n\n".join(ds[column])


def _local(alias: str, split: str) -> Path:
    """The local copy of (alias, split) under CFSP_DATA_DIR, or a UsageError saying why not."""
    spec = alias if split == DEFAULT_SPLIT.get(alias) else f"{alias}:{split}"
    relative = LOCAL_COPIES.get((alias, split))
    if relative is None:
        known = [s for a, s in LOCAL_COPIES if a == alias]
        raise UsageError(
            f"{spec}: the hub is not reachable and split {split!r} has no local copy"
            + (f" (local splits: {', '.join(known)})" if known else "")
        )
    root = local_data_dir()
    if root is None:
        raise UsageError(
            f"{spec}: the hub is not reachable and CFSP_DATA_DIR is not set (set it to a "
            f"folder holding {relative}, or use the embedded botchan / self text)"
        )
    if not (root / relative).exists():
        raise UsageError(
            f"{spec}: the hub is not reachable and CFSP_DATA_DIR={root} has no {relative}"
        )
    return check_regular_file(root / relative, f"{spec} copy")


def _alias_text(name: str, split: str | None) -> Text:
    spec = name if split is None else f"{name}:{split}"
    if name == "wikitext2":
        split = split or "test"
        if hub_reachable():
            hf_split = {"valid": "validation"}.get(split, split)
            text = _from_hub("wikitext", "wikitext-2-raw-v1", hf_split)
            return Text(text, spec, f"hub:wikitext/wikitext-2-raw-v1@{hf_split}")
        path = _local("wikitext2", split)
        return Text(
            _wikitext_rows_text(path.read_text(encoding="utf-8").splitlines()), spec, str(path)
        )
    if name == "c4":
        if hub_reachable():
            import datasets

            ds = datasets.load_dataset(
                "allenai/c4",
                data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                split="validation",
            )
            return Text("\n\n".join(ds["text"][:2000]), spec, "hub:allenai/c4@validation[:2000]")
        path = _local("c4", split or "validation")
        return Text(_read_file(path), spec, str(path))
    if name == "ptb":
        split = split or "test"
        if not hub_reachable():
            raise UsageError("ptb needs the hub (no local copy); use wikitext2, c4 or botchan")
        text = _from_hub("ptb_text_only", "penn_treebank", split, column="sentence")
        return Text(text, spec, f"hub:ptb_text_only@{split}")
    raise UsageError(f"unknown alias {name!r}")


def load_text(spec: str) -> Text:
    """Return the raw text for any spec except `self` (which needs a model)."""
    name, _, part = spec.partition(":")
    if name == "botchan":
        return _botchan(part)
    if spec.startswith("file:"):
        path = Path(spec[5:]).expanduser()
        return Text(_read_file(path), spec, str(path.resolve()))
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise UsageError(f"bad hub spec {spec!r}; use hf:NAME[:CONFIG[:SPLIT]]")
        name, config, split = (parts + [None, None])[:3]
        return Text(_from_hub(name, config, split or "test"), spec, f"hub:{spec[3:]}")
    if name in ("wikitext2", "c4", "ptb"):
        return _alias_text(name, part or None)
    raise _unknown(spec)


def _unknown(spec: str) -> UsageError:
    return UsageError(
        f"unknown text source {spec!r}; use one of {', '.join(ALIASES)}, botchan:train, "
        "botchan:test, file:PATH or hf:NAME[:CONFIG[:SPLIT]]"
    )


def _check_botchan_part(part: str) -> None:
    if part and part not in BOTCHAN_PARTS:
        raise UsageError(f"botchan:{part}: unknown part; use botchan, botchan:train, botchan:test")


def _botchan(part: str) -> Text:
    """The whole novel, or its first 80% of lines (`train`) / the remaining 20% (`test`)."""
    from cfsp.embedded import botchan_text

    _check_botchan_part(part)
    text, _ = botchan_text()
    origin = "sentencepiece==0.2.3:test/botchan.txt"
    if not part:
        return Text(text, "botchan", origin)
    lines = text.splitlines(keepends=True)
    cut = int(len(lines) * BOTCHAN_TRAIN_FRACTION)
    chosen = lines[:cut] if part == "train" else lines[cut:]
    where = f"lines 1-{cut}" if part == "train" else f"lines {cut + 1}-{len(lines)}"
    return Text("".join(chosen), f"botchan:{part}", f"{origin} ({where} of {len(lines)})")


def texts_overlap(a: str, b: str) -> bool:
    """Whether two specs may share text: the same spec, or Botchan whole and one of its parts.
    `self` text is generated by the model, so it shares nothing with a real text."""
    if "self" in (a, b):
        return False
    return a == b or {a, b} in ({"botchan", "botchan:train"}, {"botchan", "botchan:test"})


# -- checking a spec before any work ---------------------------------------------------------------
def check_source(spec: str, purpose: str) -> None:
    """Fail now, in milliseconds, if `spec` cannot give text for `purpose`.

    Resolves the spec as `load_text` would without reading the text: the spec parses, a local
    file exists, a hub source has the hub, a hub corpus has the hub or a local copy under
    CFSP_DATA_DIR. Text that needs a model (`self`) is for calibration only.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}")
    name, _, part = spec.partition(":")
    if spec == "self":
        if purpose != "calibration":
            raise UsageError(f"'self' text is for calibration only; give real text for {purpose}")
    elif name == "file":
        path = Path(part).expanduser()
        if not part:
            raise UsageError(f"{purpose} text {spec!r}: give a path after 'file:'")
        if not path.exists() and not path.is_symlink():
            raise UsageError(f"{purpose} text {spec!r}: file {path} does not exist")
        check_regular_file(path, f"{purpose} text")
    elif name == "hf":
        bits = part.split(":")
        if not bits[0] or len(bits) > 3:
            raise UsageError(f"bad hub spec {spec!r}; use hf:NAME[:CONFIG[:SPLIT]]")
        if not hub_reachable():
            raise UsageError(f"{purpose} text {spec!r} needs the hub, which is not reachable")
    elif name == "botchan":
        _check_botchan_part(part)
    elif name in DEFAULT_SPLIT:
        if hub_reachable():
            return
        if name == "ptb":
            raise UsageError("ptb needs the hub (no local copy); use wikitext2, c4 or botchan")
        _local(name, part or DEFAULT_SPLIT[name])
    else:
        raise _unknown(spec)


# -- tokens and windows ---------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def tensor_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def check_window_args(seqlen: int, count: int | None, max_len: int | None) -> None:
    if seqlen <= 0:
        raise UsageError(f"seqlen must be a positive number of tokens, got {seqlen}")
    if max_len is not None and seqlen > max_len:
        raise UsageError(f"seqlen {seqlen} exceeds the model's context ({max_len} tokens)")
    if count is not None and count <= 0:
        raise UsageError(f"the number of windows must be positive, got {count}")


def leading_bos(tokenizer) -> int | None:
    """The BOS id this tokenizer puts before text by default, else None.

    Models trained with BOS at position 0 (Gemma, Llama 2/3) score text without it far off
    their distribution (Gemma 3 270M: perplexity 728 without, 38 with, on the same Botchan
    tokens), so their windows are BOS + (seqlen - 1) text tokens. Tokenizers that add nothing
    (SmolLM2) keep windows of seqlen text tokens, exactly as before.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bos if ids and ids[0] == bos else None


def _with_bos(ids: torch.Tensor, bos: int | None) -> torch.Tensor:
    """[count, body] -> [count, body + 1] with `bos` in column 0 (unchanged without a BOS)."""
    if bos is None:
        return ids
    return torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], dim=1)


def tokenize(text: Text, tokenizer) -> torch.Tensor:
    """Token ids of `text` as plain text: a special token's spelling inside it (WikiText's
    "<unk>", a "<|endoftext|>" in a web page) is split like any other text, never turned into
    that special token (Gemma 3 maps the literal "<unk>" to its UNK id, which it never saw in
    training: WikiText-2's tokenised validation file holds 1,838 lines with one)."""
    encoded = tokenizer(
        text.text, return_tensors="pt", add_special_tokens=False, split_special_tokens=True
    )
    return encoded.input_ids[0]


def _max_len(model_or_none) -> int | None:
    config = getattr(model_or_none, "config", None)
    return getattr(config, "max_position_embeddings", None)


def calibration_windows(
    spec: str | Text,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int,
    model=None,
    heldout: int = 0,
) -> TokenWindows:
    """N windows of `seqlen` tokens at seeded random offsets (or sampled from `model`).

    `spec` is a text source spec, or a `Text` already in memory (the Python API's strings).
    `heldout` more windows of the same source, none overlapping a calibration window (drawn
    after them from the same generator, so the calibration windows do not depend on it), go to
    `TokenWindows.heldout`.
    """
    check_window_args(seqlen, nsamples, _max_len(model))
    bos = leading_bos(tokenizer)
    given = spec if isinstance(spec, Text) else None
    spec = given.source if given else spec
    if spec == "self" and given is None:
        if model is None:
            raise UsageError("the 'self' text source needs a model to sample from")
        ids, origin, text_sha = (
            generate_windows(model, tokenizer, nsamples, seqlen, seed),
            "self",
            "",
        )
        held = generate_windows(model, tokenizer, heldout, seqlen, seed + 1) if heldout else None
    else:
        text = given or load_text(spec)
        tokens = tokenize(text, tokenizer)
        body = seqlen - (bos is not None)  # text tokens per window
        if tokens.numel() < body + 1:
            raise UsageError(
                f"text source {spec!r} has {tokens.numel()} tokens, too few for windows of "
                f"{seqlen}; use a longer text or a smaller --seqlen"
            )
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, tokens.numel() - body, (nsamples,), generator=gen)
        ids = _with_bos(torch.stack([tokens[s : s + body] for s in starts.tolist()]), bos)
        origin, text_sha = text.origin, text.sha256
        held = None
        if heldout:
            kept = _disjoint_starts(starts, tokens.numel() - body, body, heldout, gen, spec)
            held = _with_bos(torch.stack([tokens[s : s + body] for s in kept]), bos)
    fingerprint = {
        "source": spec,
        "origin": origin,
        "text_sha256": text_sha,
        "mode": "calibration",
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seqlen": seqlen,
        "seed": seed,
        "count": int(ids.shape[0]),
        "hash": tensor_hash(ids),
        **({"bos": bos} if bos is not None else {}),
        **({"heldout": heldout, "heldout_hash": tensor_hash(held)} if heldout else {}),
    }
    return TokenWindows(ids, fingerprint, held)


def windows_for(calib, tokenizer, model=None, text: Text | None = None) -> TokenWindows:
    """`calibration_windows` as a calibration config asks (its source, nsamples, seqlen, seed
    and heldout), or from `text` already in memory."""
    source = text or calib.source
    return calibration_windows(
        source, tokenizer, calib.nsamples, calib.seqlen, calib.seed, model, calib.heldout
    )


def _disjoint_starts(
    starts: torch.Tensor, span: int, body: int, count: int, gen: torch.Generator, spec
) -> list[int]:
    """`count` window starts in [0, span) whose windows of `body` tokens overlap no window
    at `starts` (nor each other): held-out text is text the statistics never saw."""
    taken = sorted(starts.tolist())
    kept: list[int] = []
    for _ in range(64):
        for s in torch.randint(0, span, (4 * count,), generator=gen).tolist():
            here = bisect.bisect_right(taken, s)
            clear_left = here == 0 or taken[here - 1] + body <= s
            clear_right = here == len(taken) or s + body <= taken[here]
            if clear_left and clear_right:
                kept.append(s)
                bisect.insort(taken, s)
                if len(kept) == count:
                    return kept
    raise UsageError(
        f"text source {spec!r} is too short for {count} held-out windows of {body} tokens "
        "beside the calibration windows; use a longer text, fewer windows or heldout: 0"
    )


def evaluation_windows(
    spec: str, tokenizer, seqlen: int, limit: int | None = None, model=None
) -> TokenWindows:
    """Consecutive non-overlapping windows of `seqlen` tokens, the first `limit` if given."""
    check_window_args(seqlen, limit, _max_len(model))
    if spec == "self":
        raise UsageError("'self' is a calibration source; evaluate on real text")
    text = load_text(spec)
    tokens = tokenize(text, tokenizer)
    bos = leading_bos(tokenizer)
    body = seqlen - (bos is not None)  # text tokens per window, after the BOS if any
    available = tokens.numel() // body
    if available == 0:
        raise UsageError(
            f"text source {spec!r} has {tokens.numel()} tokens, fewer than one window of {seqlen}"
        )
    count = available if limit is None else min(limit, available)
    ids = _with_bos(tokens[: count * body].view(count, body), bos)
    fingerprint = {
        "source": spec,
        "origin": text.origin,
        "text_sha256": text.sha256,
        "mode": "evaluation",
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seqlen": seqlen,
        "limit": limit,
        "count": count,
        "available": available,
        "hash": tensor_hash(ids),
        **({"bos": bos} if bos is not None else {}),
    }
    return TokenWindows(ids, fingerprint)


@torch.no_grad()
def generate_windows(
    model, tokenizer, nsamples: int, seqlen: int, seed: int, batch_size: int = 32
) -> torch.Tensor:
    """Sample `nsamples` sequences of `seqlen` tokens from the model, starting at BOS.

    Self-generated calibration text follows the model's own distribution, which guards the
    least-squares reconstruction against overfitting a small, foreign calibration set.
    Sampling runs on the model's device (CUDA draws other samples than the CPU for a seed).
    """
    torch.manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # Keep the BOS the model was prompted with where its tokenizer puts one before text.
    skip = 0 if leading_bos(tokenizer) is not None else 1
    out = []
    for offset in range(0, nsamples, batch_size):
        n = min(batch_size, nsamples - offset)
        prompt = torch.full((n, 1), start, dtype=torch.long, device=model.device)
        seqs = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_p=0.95,
            temperature=1.0,
            max_new_tokens=seqlen,
            min_new_tokens=seqlen,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )
        out.append(seqs[:, skip : skip + seqlen].cpu())  # windows live on the CPU
    return torch.cat(out)
