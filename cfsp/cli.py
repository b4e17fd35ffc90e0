"""The `cfsp` command line. Each subcommand calls one library function; errors the user can
fix print one line and exit non-zero (2 for a bad request), with a traceback only under --debug."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cfsp import __version__
from cfsp.config import HELDOUT_WINDOWS, PruneConfig
from cfsp.engine.registry import ALLOCATIONS, CRITERIA, PRESETS, RECONSTRUCTIONS
from cfsp.errors import CfspError, UsageError

# The prune config's defaults, shown in --help (cfsp.config imports no torch).
_PRUNE_DEFAULTS = {name: field.default for name, field in PruneConfig.model_fields.items()}

log = logging.getLogger("cfsp")
app = typer.Typer(
    name="cfsp",
    help="Coarse-to-fine structured pruning of causal LMs, repaired without retraining.\n\n"
    "Model specs: smollm2-135m (embedded default) or gemma3-270m (embedded; no hub needed for "
    "either), a local HF directory, a .gguf "
    "file, or a hub id. Text specs: botchan[:train|:test], self, wikitext2[:split], c4, ptb, "
    "file:PATH, hf:NAME[:CONFIG[:SPLIT]]. wikitext2 and c4 come from the hub, else from "
    "CFSP_DATA_DIR.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: typer's rich panels print `<bool>` beside every flag
)
_state = {"debug": False}
# Printed by `cfsp --version`: the libraries whose versions change results or file formats.
VERSIONED = ("torch", "transformers", "safetensors", "peft", "lm_eval", "prefect", "mlflow", "dvc")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model spec.")]
DtypeOpt = Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16 or float16.")]
RemoteOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow modeling code shipped with the model.")
]


DeviceOpt = Annotated[
    str, typer.Option(help="auto (the GPU when there is one), cpu, cuda or cuda:N.")
]


def _check_device(name: str) -> str:
    """Resolve --device now (a usage error before any work); return the name unchanged."""
    from cfsp.devices import resolve_device

    resolve_device(name)
    return name


def _versions() -> str:
    """`cfsp X.Y.Z` and, one per line, Python's and the key libraries' installed versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    lines = [f"cfsp {__version__}", f"python {platform.python_version()}"]
    for name in VERSIONED:
        try:
            lines.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            lines.append(f"{name} not installed")
    return "\n".join(lines)


def _print_versions(value: bool) -> None:
    if value:
        typer.echo(_versions())
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the versions of cfsp, Python and the key libraries, then exit.",
            callback=_print_versions,
            is_eager=True,
        ),
    ] = False,
) -> None:
    from cfsp.logs import setup_logging

    _state["debug"] = debug
    setup_logging(verbose)


@app.command("version")
def version_cmd() -> None:
    """Print the versions of cfsp, Python and the key libraries (same as --version)."""
    typer.echo(_versions())


@app.command("eval")
def eval_cmd(
    model: ModelOpt = "smollm2-135m",
    data: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated text specs to score (default botchan:test unless --tasks)."
        ),
    ] = None,
    seqlen: Annotated[
        int, typer.Option(help="Context length of each window (always reported).")
    ] = 128,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Score only the first K perplexity windows, and the first K items of each "
            "zero-shot task unless --task-limit says otherwise."
        ),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated zero-shot tasks through lm-eval, offline on local data: piqa, "
            "arc_easy, boolq, winogrande, hellaswag."
        ),
    ] = None,
    task_limit: Annotated[
        int | None,
        typer.Option(help="Zero-shot: first N items of each task (default --limit, else all)."),
    ] = None,
    speed: Annotated[
        bool,
        typer.Option(
            help="Also measure prefill tokens/s, decode latency, MACs/token and peak memory "
            "(fp32 and bf16, medians after warm-up)."
        ),
    ] = False,
    reference: Annotated[
        str | None,
        typer.Option(
            help="With --speed: the dense model to measure in the same process; every figure "
            "is then also reported as a ratio to it."
        ),
    ] = None,
    speed_batch: Annotated[int, typer.Option(help="With --speed: sequences per prefill.")] = 1,
    dtype: DtypeOpt = "float32",
    out: Annotated[Path | None, typer.Option(help="Write the JSON result here.")] = None,
    trust_remote_code: RemoteOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Perplexity of a model on text sources at an explicit context length; optionally zero-shot
    accuracy (--tasks) and speed/memory against the dense model (--speed --reference)."""
    from cfsp.config import EvalConfig, validate
    from cfsp.evaluation.from_spec import evaluate_model

    _check_device(device)
    if out is not None:
        from cfsp.io import check_output_file

        check_output_file(out)
    cfg = validate(
        EvalConfig,
        {
            "perplexity": data.split(",") if data else ([] if tasks else ["botchan:test"]),
            "seqlen": seqlen,
            "limit": limit,
            "tasks": tasks.split(",") if tasks else [],
            "task_limit": task_limit if task_limit is not None else limit,
            "speed": {"enabled": speed, "batch": speed_batch, "seqlen": seqlen},
        },
        "evaluation options",
    )
    if reference and not speed:
        raise UsageError("--reference is only used with --speed")
    result = evaluate_model(model, cfg, dtype, trust_remote_code, reference, device)
    for source, row in result["perplexity"].items():
        typer.echo(
            f"{model}  {source}  seqlen={row['seqlen']}  windows={row['windows']}  "
            f"ppl={row['ppl']:.4f}"
        )
    if result["zeroshot"]:
        for name, row in result["zeroshot"]["tasks"].items():
            norm = f"  acc_norm={row['acc_norm']:.4f}" if "acc_norm" in row else ""
            typer.echo(f"{model}  {name}  items={row['items']}  acc={row['acc']:.4f}{norm}")
        typer.echo(f"{model}  average acc={result['zeroshot']['average_acc']:.4f}")
    if result["speed"]:
        _echo_speed(model, result["speed"])
    if out is not None:
        from cfsp.io import write_json

        write_json(out, result)
        log.info("wrote %s", out)


def _echo_speed(model: str, speed: dict) -> None:
    for dtype, row in speed["dtypes"].items():
        if "pruned" not in row:
            m = row["model"]
            typer.echo(
                f"{model}  {dtype}  prefill={m['prefill_tok_s']:.0f} tok/s  "
                f"decode={m['decode_ms_per_token']:.2f} ms/token  "
                f"peak={m['peak_memory_mib']:.0f} MiB  MACs/token={m['macs_per_token']:,}"
            )
            continue
        typer.echo(
            f"{model}  {dtype}  prefill x{row['prefill_speedup']:.3f} "
            f"(ideal x{row['ideal_speedup']:.3f})  decode x{row['decode_speedup']:.3f}  "
            f"memory x{row['memory_ratio']:.3f}  params x{row['params_ratio']:.3f}"
        )


@app.command("export-tasks")
def export_tasks_cmd(
    out: Annotated[Path, typer.Option(help="Folder for the task configs and data.")],
) -> None:
    """Write lm-eval task configs over the local evaluation data, for the plain lm_eval CLI:
    `lm_eval --model hf --model_args pretrained=DIR --tasks cfsp_piqa --include_path OUT`."""
    from cfsp.evaluation.zeroshot import export_tasks

    folder = export_tasks(out)
    typer.echo(
        f"{folder}: tasks cfsp_piqa, cfsp_arc_easy, cfsp_boolq, cfsp_winogrande, "
        "cfsp_hellaswag (tag cfsp_zeroshot)"
    )


@app.command("prune")
def prune_cmd(
    model: ModelOpt = "smollm2-135m",
    budget: Annotated[
        float,
        typer.Option(help="Fraction of decoder-block weight parameters to remove, in [0, 1)."),
    ] = 0.3,
    method: Annotated[str, typer.Option(help=f"Preset: {', '.join(PRESETS)}.")] = "cfsp",
    out: Annotated[Path, typer.Option(help="Output checkpoint directory.")] = Path("out/pruned"),
    allocation: Annotated[
        str | None,
        typer.Option(help=f"Override the preset's allocation: {ALLOCATIONS.described()}."),
    ] = None,
    criterion: Annotated[
        str | None,
        typer.Option(help=f"Override the preset's criterion: {CRITERIA.described()}."),
    ] = None,
    reconstruct: Annotated[
        str | None,
        typer.Option(help=f"Override the preset's reconstruction: {RECONSTRUCTIONS.described()}."),
    ] = None,
    structures: Annotated[
        str,
        typer.Option(
            help="ffn (FFN channels only, the default) or ffn+heads (attention heads too)."
        ),
    ] = "ffn",
    round_to: Annotated[int, typer.Option(help="Round kept FFN widths to 1, 8, 64 or 128.")] = 1,
    calib: Annotated[
        str, typer.Option(help="Calibration text spec (default: the first 80% of Botchan).")
    ] = "botchan:train",
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 128,
    heldout: Annotated[
        int,
        typer.Option(help="Held-out windows beside them, on which --control auto chooses."),
    ] = HELDOUT_WINDOWS,
    seed: Annotated[int, typer.Option(help="Seed for window sampling and random choices.")] = 0,
    temperature: Annotated[float, typer.Option(help="CFSP allocation temperature.")] = 1.0,
    control: Annotated[
        str | None,
        typer.Option(
            help="CFSP allocation control a in sigmoid(a z): lower spreads the budget more "
            "evenly over the blocks (0: uniform); 'auto' tries 0.5 and 0 and keeps the "
            "one with the lower loss on held-out calibration windows.  "
            f"[default: {_PRUNE_DEFAULTS['control']}]",
            show_default=False,
        ),
    ] = None,
    damping: Annotated[
        float | None,
        typer.Option(
            help="Ridge damping of the least-squares refit, as a fraction of the kept "
            f"inputs' mean variance.  [default: {_PRUNE_DEFAULTS['damping']}]",
            show_default=False,
        ),
    ] = None,
    stats: Annotated[
        str,
        typer.Option(
            help="Reconstruction statistics: dense (one pass), sequential (second pass) "
            "or target (second pass, refit towards the dense model's residual stream)."
        ),
    ] = "dense",
    dtype: DtypeOpt = "float32",
    overwrite: Annotated[
        bool, typer.Option(help="Replace an --out that holds a different run.")
    ] = False,
    trust_remote_code: RemoteOpt = False,
    max_shard_size: Annotated[
        str,
        typer.Option(
            help="Split the weights into model-0000k-of-0000n.safetensors files (and an "
            "index) of at most this size: 2GB, 500MB, or bytes."
        ),
    ] = "2GB",
    export: Annotated[
        str,
        typer.Option(
            help="compact (per-block widths, the speed-up), padded (stock-loadable everywhere, "
            "same outputs, no speed-up), uniform (stock-loadable; needs allocation=uniform), or "
            "a list such as compact,padded: the first goes to --out, others to OUT-KIND."
        ),
    ] = "compact",
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--in-memory",
            help="Engine. Default: block-streamed (weights read and written block by block, "
            "memory bounded by one block) for a safetensors directory or alias and the compact "
            "export; otherwise in memory (GGUF, hub ids, padded/uniform exports, remote code).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Prune a model to a budget and write a checkpoint directory with its manifest."""
    from cfsp.config import CalibConfig, PruneConfig, validate
    from cfsp.io import check_writable_parent, parse_shard_size
    from cfsp.pruning import prune_to_checkpoint
    from cfsp.pruning_streamed import engine_for

    parse_shard_size(max_shard_size)  # a bad size fails now, not after the pruning
    _check_device(device)

    prune_values = {
        "budget": budget,
        "method": method,
        "structures": structures,
        "round_to": round_to,
        "seed": seed,
        "temperature": temperature,
        "stats": stats,
    }
    for key, value in (
        ("allocation", allocation),
        ("criterion", criterion),
        ("reconstruct", reconstruct),
        ("control", control),
        ("damping", damping),
    ):
        if value is not None:
            prune_values[key] = value
    prune_cfg = validate(PruneConfig, prune_values, "prune options")
    calib_cfg = validate(
        CalibConfig,
        {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "heldout": heldout},
        "calibration options",
    )
    options = {"overwrite": overwrite, "max_shard_size": max_shard_size, "export": export}
    check_writable_parent(out)  # an unwritable --out first, as both engines check it
    stream = engine_for(model, export, stream, trust_remote_code, dtype, max_shard_size)
    if stream:
        from cfsp.pruning_streamed import prune_streamed_to_checkpoint

        manifest = prune_streamed_to_checkpoint(
            model, calib_cfg, prune_cfg, out, dtype, device, trust_remote_code, **options
        )
    else:
        manifest = prune_to_checkpoint(
            model, calib_cfg, prune_cfg, out, dtype, trust_remote_code, device=device, **options
        )
    report = manifest["prune"]
    typer.echo(
        f"{out}: removed {100 * report['achieved_fraction']:.2f}% of block parameters "
        f"({manifest['params_before']:,} -> {manifest['params_after']:,} parameters)"
    )
    for kind, folder in manifest["exports"].items():
        typer.echo(f"{kind} export: {folder}")


ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params.yaml to use.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a parameter: dotted.key=YAML value (repeatable)."),
]


def _params(path: Path, overrides: list[str] | None = None):
    from cfsp.config import Params, load_params, validate

    exists = path.exists() or path.is_symlink()
    params = load_params(path) if exists or str(path) != "params.yaml" else Params()
    if not overrides:
        return params
    data = params.model_dump()
    for item in overrides:
        _apply_override(data, item)
    return validate(Params, data, f"{path} with --set")


def _apply_override(data: dict, item: str) -> None:
    """Set one `dotted.key=YAML value` in `data`; a key that walks into a list or a value, or
    a value that is not YAML, is a usage error naming the override."""
    from cfsp.config import load_yaml

    key, sep, value = item.partition("=")
    if not sep or not all(key.split(".")):
        raise UsageError(f"--set {item!r}: expected dotted.key=value")
    node = data
    *parents, leaf = key.split(".")
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parents[: depth + 1])
            raise UsageError(
                f"--set {item!r}: {where} is {type(node).__name__}, not a section with keys"
            )
    node[leaf] = load_yaml(value, f"--set {item!r}: the value")


@app.command("verify")
def verify_cmd(directory: Annotated[Path, typer.Argument(help="A pruned checkpoint directory.")]):
    """Check every file of a checkpoint against the sha256 recorded in its manifest."""
    from cfsp.errors import CfspError
    from cfsp.export import MANIFEST, recorded_hashes, verify_checkpoint
    from cfsp.io import sha256_file

    problems = verify_checkpoint(directory)
    if problems:
        raise CfspError(f"{directory} does not match its manifest: " + "; ".join(problems))
    recorded, complete = recorded_hashes(directory)
    scope = (
        f"all {len(recorded)} files checked"
        if complete
        else "older manifest: only the weights are recorded"
    )
    typer.echo(f"{directory}: weights match the manifest ({scope})")
    typer.echo(f"manifest sha256 {sha256_file(directory / MANIFEST)} (compare with a trusted copy)")


@app.command("run")
def run_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run the whole pipeline (Prefect flow `sweep`) for every model x budget x method.

    Stages are cached across runs: an identical rerun is served from cache and changing an
    evaluation parameter reruns only evaluation. Results are tracked in MLflow (sqlite in the
    output directory unless MLFLOW_TRACKING_URI is set) and summarised in a table.
    """
    p = _params(params, set_)
    from cfsp.prefect_env import configure_prefect

    configure_prefect()
    from cfsp.pipeline.flows import run_sweep

    start = time.perf_counter()
    try:
        summaries = run_sweep(p)
    except RuntimeError as err:
        if "API" not in str(err) and "server" not in str(err).lower():
            raise
        from cfsp.errors import CfspError

        raise CfspError(
            f"Prefect is not available: {str(err).rstrip('.')}. Unset PREFECT_API_URL to use a "
            "temporary local server, point it at a running one (`prefect server start`), or raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a slow machine"
        ) from err
    _print_summaries(summaries, time.perf_counter() - start)
    _print_protocol(p, summaries)


def _print_protocol(p, summaries: list[dict]) -> None:
    """What the numbers above mean: which text calibrated, which evaluated, where outputs are."""
    from cfsp.data import texts_overlap

    cal, ev = p.prepare, p.evaluate
    limit = f"first {ev.limit}" if ev.limit else "all"
    typer.echo(
        f"calibration: {cal.source}, {cal.nsamples} windows x {cal.seqlen} tokens (seed "
        f"{cal.seed}); evaluation: {', '.join(ev.perplexity)}, {limit} windows of {ev.seqlen}"
    )
    shared = [s for s in ev.perplexity if texts_overlap(cal.source, s)]
    if shared:
        typer.echo(f"note: calibration text overlaps the evaluation text of {', '.join(shared)}")
    elif cal.source != "self":
        typer.echo("calibration and evaluation texts are disjoint")
    for s in summaries:
        typer.echo(f"checkpoint {s['name']}: {s['checkpoint']}")


DeployName = Annotated[str, typer.Option("--name", help="Deployment name.")]
TimezoneOpt = Annotated[
    str, typer.Option("--timezone", help="IANA time zone of --cron, e.g. Europe/Berlin.")
]
ConcurrencyOpt = Annotated[
    int, typer.Option("--concurrency", help="Runs of the deployment at once; later ones wait.")
]


def _deploy_request(params, set_, cron, timezone, concurrency, **names: str):
    """The parameters and DeploySpec of `deploy`/`serve`, every check made before anything is
    registered: params, Prefect's environment, schedule, names, a Prefect server at
    PREFECT_API_URL and, last, the whole request (as `cfsp run` checks it)."""
    p = _params(params, set_)
    from cfsp.prefect_env import configure_prefect

    configure_prefect()
    from cfsp.pipeline.deploy import DeploySpec, check_names
    from cfsp.pipeline.flows import check_request
    from cfsp.servers import check_concurrency, check_schedule, require_prefect_server

    check_schedule("0 0 * * *" if cron is None else cron, timezone)  # the zone even alone
    check_concurrency(concurrency)
    check_names(**names)
    require_prefect_server()
    check_request(p)
    return p, DeploySpec(names["name"], cron, timezone, concurrency)


@app.command("deploy")
def deploy_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule, e.g. '0 3 * * *'; none: run on demand.")
    ] = None,
    timezone: TimezoneOpt = "UTC",
    concurrency: ConcurrencyOpt = 1,
    name: DeployName = "cfsp-sweep",
    pool: Annotated[str, typer.Option(help="Process work pool (created when missing).")] = "cfsp",
) -> None:
    """Deploy the sweep to a Prefect process work pool; `prefect worker start --pool POOL`
    runs it on schedule or on `prefect deployment run sweep/NAME`.

    The params file (with -S overrides) becomes the deployment's default parameters, typed and
    validated by the params model; the current folder becomes the worker's working directory.
    Needs PREFECT_API_URL set to a running server (`prefect server start`).
    """
    p, spec = _deploy_request(params, set_, cron, timezone, concurrency, name=name, pool=pool)
    from cfsp.pipeline.deploy import deploy_to_pool

    deployment_id, created = deploy_to_pool(p, spec, pool)
    if created:
        typer.echo(f"created process work pool {pool!r}")
    when = f"{cron} ({timezone})" if cron else "on demand"
    typer.echo(
        f"deployed sweep/{name} ({deployment_id}) to pool {pool!r}: {when}, at most "
        f"{concurrency} run(s) at once"
    )
    typer.echo(f"start a worker:  prefect worker start --pool {pool}")
    typer.echo(f"run it now:      prefect deployment run sweep/{name}")


@app.command("serve")
def serve_cmd(
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 3 * * *' (03:00 daily).")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    timezone: TimezoneOpt = "UTC",
    concurrency: ConcurrencyOpt = 1,
    name: DeployName = "cfsp-sweep",
) -> None:
    """Serve the sweep on a schedule from this process (runs until interrupted): the same
    deployment as `cfsp deploy`, without a work pool or worker.

    Needs PREFECT_API_URL set to a Prefect server that outlives this process: start one with
    `prefect server start` (it binds 127.0.0.1).
    """
    p, spec = _deploy_request(params, set_, cron, timezone, concurrency, name=name)
    from prefect import serve

    from cfsp.pipeline.deploy import sweep_deployment

    serve(sweep_deployment(p, spec))


@app.command("dashboard")
def dashboard_cmd(
    params: ParamsOpt = Path("params.yaml"),
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Run an MLflow tracking server on the tracked runs: 127.0.0.1, one worker, the sqlite
    (or configured) backend, artifacts proxied by the server into <output>/mlartifacts."""
    import os

    from cfsp.interrupts import run_foreground
    from cfsp.servers import check_port

    check_port(port)
    p = _params(params)
    uri = p.tracking.resolved_uri(p.output)
    artifacts = (Path(p.output) / "mlartifacts").absolute()
    typer.echo(
        f"MLflow server on http://127.0.0.1:{port} for {uri}, artifacts in {artifacts} "
        f"(log to it with MLFLOW_TRACKING_URI=http://127.0.0.1:{port}; Ctrl-C to stop)"
    )
    cmd = [
        *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri),
        *("--serve-artifacts", "--artifacts-destination", artifacts.as_uri()),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    code = run_foreground(cmd, env=dict(os.environ))
    if code != 0:
        raise CfspError(f"the MLflow server stopped with exit status {code}")


def _print_summaries(summaries: list[dict], seconds: float) -> None:
    """The sweep's results table (the report's own) and where the report is."""
    from cfsp.report import results_table

    typer.echo(f"cfsp results ({seconds:.0f}s)")
    if summaries:
        typer.echo(results_table(summaries))
        typer.echo(f"report: {summaries[0]['sweep_report']}; dashboard: cfsp dashboard")


stage_app = typer.Typer(
    help="Run one pipeline stage with the parameters of a params.yaml (what dvc.yaml calls).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(stage_app, name="stage")
OutOpt = Annotated[Path, typer.Option("--out", help="Output directory of this stage.")]
StageModelOpt = Annotated[str, typer.Option("--model", "-m", help="Dense model spec.")]
BudgetOpt = Annotated[float, typer.Option(help="Budget (fraction of block parameters).")]
StageDeviceOpt = Annotated[
    str | None,
    typer.Option(help="auto, cpu, cuda or cuda:N; overrides the params file's `device`."),
]


def _stage_params(path: Path, device: str | None):
    """The params file, with `device` replaced when --device is given (checked first)."""
    if device is None:
        return _params(path)
    return _params(path, [f"device={_check_device(device)}"])


MethodOpt = Annotated[str, typer.Option(help="Method variant, e.g. cfsp or flap+reconstruct=liar.")]


def _run_stage(name: str, p, model: str, out: Path, inputs: dict, prune=None, reference=None):
    """Run a registered stage (cfsp.pipeline.registry) with its declared params sections, into
    the one store's record (reused when fresh); returns the stage's result."""
    from cfsp.pipeline.registry import StageContext, sections
    from cfsp.pipeline.store import run_recorded

    ctx = StageContext(
        model=str(model),
        out=out,
        inputs=inputs,
        sections=sections(name, p),
        prune=None if prune is None else prune.model_dump(),
        reference=reference,
    )
    return run_recorded(name, ctx)["info"]


@stage_app.command("prepare")
def stage_prepare(model: StageModelOpt, out: OutOpt, params: ParamsOpt = Path("params.yaml")):
    """Calibration text -> token windows (tokens.safetensors)."""
    p = _params(params)
    fp = _run_stage("prepare", p, model, out, {})
    typer.echo(f"{out}: {fp['count']} windows x {fp['seqlen']} tokens from {fp['source']}")


@stage_app.command("capture")
def stage_capture(
    model: StageModelOpt,
    tokens: Annotated[Path, typer.Option()],
    out: OutOpt,
    params: ParamsOpt = Path("params.yaml"),
    device: StageDeviceOpt = None,
):
    """One streamed pass over the calibration tokens -> per-block statistics
    (moments.safetensors, O(width); grams/block-NNNNN.safetensors, one block each)."""
    p = _stage_params(params, device)
    info = _run_stage("capture", p, model, out, {"prepare": tokens})
    typer.echo(f"{out}: statistics of {info['blocks']} blocks in {info['wall_s']:.1f}s")


@stage_app.command("allocate")
def stage_allocate(
    model: StageModelOpt,
    stats: Annotated[Path, typer.Option()],
    tokens: Annotated[
        Path, typer.Option(help="Prepare output: its held-out windows choose control: auto.")
    ],
    out: OutOpt,
    budget: BudgetOpt,
    method: MethodOpt,
    params: ParamsOpt = Path("params.yaml"),
    plot_data: Annotated[
        Path | None, typer.Option(help="Also write per-block keep ratios as CSV (for dvc plots).")
    ] = None,
    device: StageDeviceOpt = None,
):
    """Statistics + budget -> per-block keep ratios and kept indices (allocation.json/.png)."""
    p = _stage_params(params, device)
    cfg = _prune_cfg(p, method, budget)
    if plot_data is not None:
        from cfsp.io import check_output_file

        check_output_file(plot_data)
    info = _run_stage("allocate", p, model, out, {"prepare": tokens, "capture": stats}, cfg)
    if plot_data is not None:
        from cfsp.pipeline.store import write_side_output

        write_side_output("allocate", plot_data, info)
    typer.echo(f"{out}: keep ratios {min(info['keep_ratios']):.3f}..{max(info['keep_ratios']):.3f}")


def _prune_cfg(p, method, budget):
    from pydantic import ValidationError

    from cfsp.config import PruneConfig, explain, prune_config

    try:
        return prune_config(p, method, budget)
    except (ValidationError, ValueError) as err:
        detail = explain(err, PruneConfig) if isinstance(err, ValidationError) else err
        raise UsageError(f"method {method!r} at budget {budget}: {detail}") from None


@stage_app.command("prune")
def stage_prune(
    model: StageModelOpt,
    stats: Annotated[Path, typer.Option()],
    allocation: Annotated[Path, typer.Option()],
    out: OutOpt,
    budget: BudgetOpt,
    method: MethodOpt,
    params: ParamsOpt = Path("params.yaml"),
    device: StageDeviceOpt = None,
):
    """Dense model + allocation -> physically pruned checkpoint (no compensation)."""
    p = _stage_params(params, device)
    inputs = {"capture": stats, "allocate": allocation}
    info = _run_stage("prune", p, model, out, inputs, _prune_cfg(p, method, budget))
    typer.echo(f"{out}: {100 * info['achieved_fraction']:.2f}% of block parameters removed")


@stage_app.command("reconstruct")
def stage_reconstruct(
    model: StageModelOpt,
    allocation: Annotated[Path, typer.Option(help="Allocate output (kept indices).")],
    stats: Annotated[Path, typer.Option()],
    tokens: Annotated[Path, typer.Option()],
    out: OutOpt,
    budget: BudgetOpt,
    method: MethodOpt,
    params: ParamsOpt = Path("params.yaml"),
    device: StageDeviceOpt = None,
):
    """Dense model + allocation + statistics -> reconstructed checkpoint (the method's
    reconstruction folded into the kept channels)."""
    p = _stage_params(params, device)
    cfg = _prune_cfg(p, method, budget)
    inputs = {"prepare": tokens, "capture": stats, "allocate": allocation}
    _run_stage("reconstruct", p, model, out, inputs, cfg)
    typer.echo(f"{out}: reconstructed with {cfg.reconstruct}")


@stage_app.command("recover")
def stage_recover(
    checkpoint: Annotated[Path, typer.Option(help="Reconstructed checkpoint to heal.")],
    stats: Annotated[Path, typer.Option(help="Capture output (block angular distances).")],
    out: OutOpt,
    params: ParamsOpt = Path("params.yaml"),
    device: StageDeviceOpt = None,
):
    """Checkpoint -> LoRA-healed checkpoint, adapters merged (params.yaml `recover`; when
    recover.enabled is false the input is passed through as hard links)."""
    p = _stage_params(params, device)
    info = _run_stage("recover", p, "", out, {"reconstruct": checkpoint, "capture": stats})
    if not info.get("enabled", True):
        typer.echo(f"{out}: recovery disabled, checkpoint passed through")
        return
    losses = info["losses"]
    typer.echo(f"{out}: {info['mode']} LoRA, loss {losses[0]:.4f} -> {losses[-1]:.4f}")


@stage_app.command("evaluate")
def stage_evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to score.")],
    out: OutOpt,
    params: ParamsOpt = Path("params.yaml"),
    metrics: Annotated[
        Path | None, typer.Option(help="Also write the flat metrics JSON here (for dvc metrics).")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="Dense model for speed ratios (when evaluate.speed.enabled)."),
    ] = None,
    device: StageDeviceOpt = None,
):
    """Checkpoint -> metrics.json (perplexity at the configured seqlen, parameter count,
    zero-shot accuracy and speed when configured)."""
    from cfsp.metrics import flatten
    from cfsp.pipeline.store import write_side_output

    p = _stage_params(params, device)
    if metrics is not None:
        from cfsp.io import check_output_file

        check_output_file(metrics)
    if reference is None:  # a model scored on its own (the dense one in dvc.yaml)
        stage, result = "evaluate-dense", _run_stage("evaluate-dense", p, model, out, {})
    else:
        inputs = {"recover": Path(model)}
        stage, result = "evaluate", _run_stage("evaluate", p, model, out, inputs, None, reference)
    flat = flatten(result)
    if metrics is not None:
        write_side_output(stage, metrics, result)
    typer.echo(f"{out}: " + ", ".join(f"{k} {v:.6g}" for k, v in flat.items()))


@stage_app.command("track")
def stage_track(params: ParamsOpt = Path("params.yaml")):
    """The sweep's MLflow runs from the stage records and dvc.lock (dvc.yaml's final stage): a
    parent run and one child run per model x budget x method, as `cfsp run` logs them."""
    from cfsp.pipeline.lineage import plan
    from cfsp.pipeline.publish import track_stored

    p = _params(params)
    summaries = track_stored(p, plan(p))
    for s in summaries:
        typer.echo(f"MLflow run {s['mlflow_run_id']}: {s['name']}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: map our errors to one line and an exit code.

    Click's usage errors (unparsable values, unknown options) are one `error:` line too, exit
    code 2. SIGTERM/SIGINT/SIGHUP unwind like an error (temporaries removed, see
    cfsp.interrupts) and exit 128 + the signal number.
    """
    # Typer >= 0.22 carries its own copy of click; its exceptions live there.
    from typer._click.exceptions import NoArgsIsHelpError

    from cfsp.interrupts import Interrupted, signals_raise
    from cfsp.io import remove_live_temporaries

    try:
        with signals_raise():
            code = app(args=argv, standalone_mode=False)  # --help, --version: Exit -> its code
        return code if isinstance(code, int) else 0
    except NoArgsIsHelpError as bare:  # `cfsp stage`: the help text
        bare.show()
        return bare.exit_code
    except typer.TyperException as err:  # click's usage errors (exit 2) and file errors
        typer.secho(f"error: {_click_message(err)}", err=True, fg="red")
        return err.exit_code
    except typer.Abort:
        typer.secho("interrupted", err=True)
        return 130
    except Interrupted as stop:
        remove_live_temporaries()
        typer.secho(str(stop), err=True)
        return stop.exit_code
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except CfspError as err:
        if _state["debug"]:
            raise
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        typer.secho(f"error: {message}", err=True, fg="red")  # one line, whatever it wraps
        return err.exit_code
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        return 130


def _click_message(err) -> str:
    """Click's message on one line, pointing at the subcommand's --help for usage errors."""
    message = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        names = []
        while ctx.parent is not None:  # the root's name is whatever launched us: say `cfsp`
            names.append(ctx.info_name)
            ctx = ctx.parent
        message = message.rstrip(".") + f" (see `{' '.join(['cfsp', *reversed(names)])} --help`)"
    return message


def entry() -> None:
    from cfsp.interrupts import exit_now

    code = main()
    if code in (129, 130, 143):  # interrupted: do not wait for worker threads
        exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
