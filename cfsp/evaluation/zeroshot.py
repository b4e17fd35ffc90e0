"""Zero-shot multiple-choice accuracy through lm-eval, on local data files, fully offline.

`export_tasks` turns the local copies of PIQA, ARC-Easy, BoolQ, WinoGrande and HellaSwag (see
`shared/data/SOURCES.md`) into one normalised jsonl file per task, with the gold answer merged in
as an int field `label`, plus an lm-eval task YAML (`dataset_path: json`, absolute data_files)
whose prompt mirrors lm-eval's own task of the same name. The tasks are called `cfsp_piqa`,
`cfsp_arc_easy`, ... so they never clash with lm-eval's built-in tasks, and the exported folder
works with the plain CLI: `lm_eval --model hf --model_args pretrained=DIR --tasks cfsp_piqa
--include_path FOLDER`. Extra files in ARC layout (ARC-Challenge, OpenBookQA) can be exported
too; they get the ARC prompt.

`zeroshot` scores an in-memory transformers model (pruned models can have per-block widths that
stock loading cannot build) with lm-eval's HFLM (as `ContinuationHFLM`, which computes the LM
head on the scored positions only) and `lm_eval.simple_evaluate` over a temporary export.
Prompts that differ from lm-eval's (HellaSwag only, from its derived data) are listed in
`DEVIATIONS`.
"""

from __future__ import annotations

import bz2
import functools
import json
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cfsp.errors import UsageError
from cfsp.io import atomic_dir, sha256_file

TASKS_MANIFEST = "cfsp_tasks.json"
TAG = "cfsp_zeroshot"
DEVIATIONS = {
    "cfsp_hellaswag": "built from a derived text file whose context is `activity_label: ctx` with "
    "ctx_b not capitalised (lm-eval uses ctx_a + ' ' + ctx_b.capitalize()); lm-eval's bracket "
    "clean-up is applied on top of the derived file's own",
}


@dataclass(frozen=True)
class Prompt:
    """The lm-eval fields that define a multiple-choice task."""

    text: str
    choice: str | list[str]
    target: str
    metrics: tuple[str, ...] = ("acc", "acc_norm")


# Mirrors lm_eval/tasks/{piqa,arc,super_glue/boolq,winogrande,hellaswag} of lm-eval 0.4.x.
PROMPTS = {
    "piqa": Prompt("Question: {{goal}}\nAnswer:", "{{[sol1, sol2]}}", "label"),
    "arc": Prompt(
        "Question: {{question}}\nAnswer:", "{{choices.text}}", "{{choices.label.index(answerKey)}}"
    ),
    "boolq": Prompt(
        "{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"], "label", ("acc",)
    ),
    # Partial evaluation: one context per option (sentence up to "_" + option), the same
    # continuation (the rest of the sentence); an int doc_to_text is the gold context index.
    "winogrande": Prompt("label", "contexts", "continuation", ("acc",)),
    "hellaswag": Prompt("{{query}}", "choices", "{{label}}"),
}


# -- readers: source files -> normalised docs ----------------------------------------------------
def _require(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise UsageError(
            f"zero-shot data file {path} not found "
            f"(set CFSP_DATA_DIR to a folder holding {relative}; see shared/data/SOURCES.md)"
        )
    return path


def _jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_piqa(root: Path) -> list[dict]:
    docs = _jsonl(_require(root, "piqa/dev.jsonl"))
    labels = _require(root, "piqa/dev-labels.lst").read_text().split()
    if len(labels) != len(docs):
        raise UsageError(f"piqa: {len(docs)} items but {len(labels)} labels")
    return [{**doc, "label": int(label)} for doc, label in zip(docs, labels, strict=True)]


def read_arc(path: Path) -> list[dict]:
    """AI2 layout -> the HF `allenai/ai2_arc` layout that lm-eval's ARC prompt expects."""
    docs = []
    for row in _jsonl(path):
        choices = row["question"]["choices"]
        labels = [c["label"] for c in choices]
        docs.append(
            {
                "id": row["id"],
                "question": row["question"]["stem"],
                "choices": {"text": [c["text"] for c in choices], "label": labels},
                "answerKey": row["answerKey"],
                "label": labels.index(row["answerKey"]),
            }
        )
    return docs


def read_boolq(root: Path) -> list[dict]:
    labels = {"false": 0, "true": 1, False: 0, True: 1}
    return [
        {**row, "label": labels[row["label"]]} for row in _jsonl(_require(root, "boolq/val.jsonl"))
    ]


def read_winogrande(root: Path) -> list[dict]:
    docs = []
    for row in _jsonl(_require(root, "winogrande/dev.jsonl")):
        cut = row["sentence"].index("_")
        contexts = [row["sentence"][:cut] + opt for opt in (row["option1"], row["option2"])]
        continuation = row["sentence"][cut + 1 :].strip()
        label = {"1": 0, "2": 1}[row["answer"]]
        docs.append({**row, "label": label, "contexts": contexts, "continuation": continuation})
    return docs


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py `preprocess`."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def read_hellaswag(root: Path) -> list[dict]:
    with bz2.open(_require(root, "hellaswag/hellaswag_val_full.txt.bz2"), "rt") as f:
        lines = f.read().split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines
    if len(lines) % 6:
        raise UsageError(f"hellaswag: {len(lines)} lines is not a multiple of 6")
    return [
        {
            "query": hellaswag_preprocess(lines[i]),
            "choices": [hellaswag_preprocess(e) for e in lines[i + 2 : i + 6]],
            "label": int(lines[i + 1]),
        }
        for i in range(0, len(lines), 6)
    ]


@dataclass(frozen=True)
class Source:
    prompt: str  # key of PROMPTS
    split: str  # the split lm-eval's own task evaluates
    read: Callable[[Path | None], list[dict]]  # data folder (None: extra files only)
    files: tuple[str, ...]  # relative to the data folder, for the manifest


SOURCES = {
    "piqa": Source("piqa", "validation", read_piqa, ("piqa/dev.jsonl", "piqa/dev-labels.lst")),
    "arc_easy": Source(
        "arc",
        "test",
        lambda r: read_arc(_require(r, "arc/ARC-Easy-Test.jsonl")),
        ("arc/ARC-Easy-Test.jsonl",),
    ),
    "boolq": Source("boolq", "validation", read_boolq, ("boolq/val.jsonl",)),
    "winogrande": Source("winogrande", "validation", read_winogrande, ("winogrande/dev.jsonl",)),
    "hellaswag": Source(
        "hellaswag", "validation", read_hellaswag, ("hellaswag/hellaswag_val_full.txt.bz2",)
    ),
}


# -- task names --------------------------------------------------------------------------------
def _short(name: str) -> str:
    return name.removeprefix("cfsp_")


def task_sources(extra_arc: dict[str, str | Path] | None = None) -> dict[str, Source]:
    """Short name -> Source: the five built-in tasks plus extra ARC-layout files."""
    sources = dict(SOURCES)
    for name, path in (extra_arc or {}).items():
        short = _short(name)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", short) or short in SOURCES:
            raise UsageError(
                f"extra task name {name!r}: use lower-case letters, digits and _, "
                f"and not one of {', '.join(SOURCES)}"
            )
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"extra task {name}: file {path} does not exist")
        sources[short] = Source("arc", "test", lambda _root, p=path: read_arc(p), (str(path),))
    return sources


def resolve_tasks(tasks: list[str], sources: dict[str, Source]) -> list[str]:
    """Short or cfsp_ names -> short names, in order, without repeats."""
    if not tasks:
        raise UsageError(f"no zero-shot task given (known: {', '.join(sources)})")
    unknown = [t for t in tasks if _short(t) not in sources]
    if unknown:
        raise UsageError(
            f"unknown zero-shot task(s) {', '.join(unknown)} (known: {', '.join(sources)})"
        )
    return list(dict.fromkeys(_short(t) for t in tasks))


def _data_root(data_dir: str | Path | None) -> Path:
    from cfsp.data import local_data_dir

    root = Path(data_dir).expanduser() if data_dir is not None else local_data_dir()
    if root is None or not root.is_dir():
        raise UsageError(
            "zero-shot evaluation needs the local data folder "
            f"({root if root else 'CFSP_DATA_DIR is not set'}): set CFSP_DATA_DIR to a folder "
            "holding piqa/, arc/, boolq/, winogrande/, hellaswag/ (see SOURCES.md)"
        )
    return root.resolve()


def check_tasks(tasks: list[str], data_dir: str | Path | None = None) -> None:
    """Fail now if a task is unknown or its data files are missing (nothing is read)."""
    names = resolve_tasks(tasks, SOURCES)
    root = _data_root(data_dir)
    for name in names:
        for relative in SOURCES[name].files:
            _require(root, relative)


# -- export ------------------------------------------------------------------------------------
def task_config(name: str, source: Source, jsonl: Path, cache_dir: Path) -> dict:
    """The lm-eval YAML (as a dict) for task `cfsp_<name>` reading `jsonl`."""
    prompt = PROMPTS[source.prompt]
    return {
        "tag": [TAG],
        "task": f"cfsp_{name}",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {source.split: str(jsonl)},
            "cache_dir": str(cache_dir),
        },
        "output_type": "multiple_choice",
        f"{source.split}_split": source.split,
        "num_fewshot": 0,  # no training split here: zero-shot only
        "doc_to_text": prompt.text,
        "doc_to_target": prompt.target,
        "doc_to_choice": prompt.choice,
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in prompt.metrics
        ],
        "metadata": {"version": 1.0},
    }


def _write_task(tmp: Path, final: Path, name: str, source: Source, docs: list[dict]) -> dict:
    import yaml

    with open(tmp / f"cfsp_{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
    config = task_config(name, source, final / f"cfsp_{name}.jsonl", final / ".hf_cache")
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    (tmp / f"cfsp_{name}.yaml").write_text(text, encoding="utf-8")
    return {"items": len(docs), "split": source.split, "prompt": source.prompt}


def export_tasks(
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    extra_arc: dict[str, str | Path] | None = None,
    tasks: list[str] | None = None,
) -> Path:
    """Write `cfsp_<task>.jsonl` + `cfsp_<task>.yaml` per task to `out_dir` (atomically).

    `extra_arc` maps more task names to ARC-layout jsonl files (e.g. {"arc_challenge": path});
    `tasks` picks a subset (default: all). Returns the folder to pass as --include_path.
    """
    sources = task_sources(extra_arc)
    names = resolve_tasks(tasks, sources) if tasks is not None else list(sources)
    # Extra ARC files carry absolute paths: the data folder is needed only for built-in tasks.
    root = _data_root(data_dir) if set(names) & set(SOURCES) else None
    docs = {name: sources[name].read(root) for name in names}  # fail before writing anything
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / TASKS_MANIFEST).is_file():
        raise UsageError(f"{out_dir} exists and is not a cfsp task export: refusing to replace it")
    with atomic_dir(out_dir) as tmp:  # io's swap: a previous export is replaced or kept whole
        manifest = {"data_dir": str(root) if root else None, "tasks": {}}
        for name in names:
            info = _write_task(tmp, out_dir, name, sources[name], docs[name])
            files = {f: sha256_file(Path(root or "/", f)) for f in sources[name].files}
            manifest["tasks"][f"cfsp_{name}"] = {**info, "sources": files}
        (tmp / TASKS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


# -- evaluation --------------------------------------------------------------------------------
def _summary(results: dict, names: list[str], limit: int | None, version: str) -> dict:
    rows = {}
    for name in names:
        full = f"cfsp_{name}"
        metrics = results["results"][full]
        row = {"acc": float(metrics["acc,none"])}
        if "acc_norm,none" in metrics:
            row["acc_norm"] = float(metrics["acc_norm,none"])
        row["items"] = int(results["n-samples"][full]["effective"])
        if "samples" in results:  # per item, in data order: log-likelihood of each choice
            samples = sorted(results["samples"][full], key=lambda x: x["doc_id"])
            row["loglikelihoods"] = [[float(r[0]) for r in x["filtered_resps"]] for x in samples]
        rows[name] = row
    average = sum(r["acc"] for r in rows.values()) / len(rows)
    return {"lm_eval_version": version, "limit": limit, "tasks": rows, "average_acc": average}


def _bars_on_terminal_only(lm) -> None:
    """lm-eval's request bars ("Running loglikelihood requests") pass `disable=False`
    explicitly, so TQDM_DISABLE cannot switch them off; off a terminal (logs, CI) they would
    print hundreds of redraws. lm-eval's own `disable_tqdm` argument turns them off there."""
    if sys.stderr.isatty():
        return
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))


def zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    extra_arc: dict[str, str | Path] | None = None,
    per_item: bool = False,
) -> dict:
    """Zero-shot accuracy of an in-memory model on `tasks` (short names, e.g. "piqa").

    `limit` takes the first N items of each task (None: all). Returns {"lm_eval_version",
    "limit", "tasks": {name: {"acc", "acc_norm" (if the task has it), "items"}}, "average_acc"};
    `per_item` adds "loglikelihoods" (per item, per choice) to each task.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UsageError(f"zero-shot limit must be a positive number of items, not {limit!r}")
    sources = task_sources(extra_arc)
    names = resolve_tasks(tasks, sources)
    # Nothing here reaches for the hub: the tasks are local JSON files (datasets' packaged
    # `json` builder) and the model and tokenizer are in-memory objects. So no HF_*_OFFLINE
    # variables are set: os.environ is shared by every thread (tests/test_zeroshot.py runs
    # this with the network refused).
    with tempfile.TemporaryDirectory(prefix="cfsp-zeroshot-") as tmp:
        folder = export_tasks(Path(tmp) / "tasks", data_dir, extra_arc, names)
        import lm_eval
        from lm_eval.tasks import TaskManager

        from cfsp.evaluation.zeroshot_lm import ContinuationHFLM

        lm = ContinuationHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        _bars_on_terminal_only(lm)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[f"cfsp_{n}" for n in names],
            num_fewshot=None,  # the YAML fixes 0
            limit=limit,
            bootstrap_iters=0,
            log_samples=per_item,
            random_seed=None,  # multiple choice needs no randomness: leave the caller's RNGs
            numpy_random_seed=None,
            torch_random_seed=None,
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        )
    return _summary(results, names, limit, lm_eval.__version__)
