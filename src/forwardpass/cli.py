"""The `forwardpass` command line: demo, models, predict, import.

    forwardpass demo --samples samples       # build the demo repository, write sample inputs
    forwardpass predict digits samples/digit-3.png
    forwardpass predict iris '{"sepal length (cm)": 5.1, ...}' --json
    forwardpass import sklearn model.joblib --name churn --trust --repository models
"""

from __future__ import annotations

import csv
import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from forwardpass._deps import require
from forwardpass.cli_tenants import add_commands as add_tenant_commands
from forwardpass.errors import ForwardpassError
from forwardpass.pipeline.answers import Answers
from forwardpass.tasks import generative


class _Command(typer.core.TyperCommand):
    """Usage lines in click's classic form (``MODEL INPUTS...``), not typer's ``{model} {inputs}...``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = param.metavar or (param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


class _App(typer.Typer):
    """Plain help text: no rich markup (it ate '[default: ...]' and '[batch]'), no '<bool>' on flags."""

    def __init__(self, **kwargs: Any):
        super().__init__(rich_markup_mode=None, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _App(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
           help="forwardpass: AI inference on ONNX Runtime.")  # fmt: skip
import_app = _App(no_args_is_help=True, help="Import models from other frameworks into a repository.")
app.add_typer(import_app, name="import")
out = Console()
err = Console(stderr=True)
add_tenant_commands(app, _App, out, err)  # keys create/list/revoke, usage

RepositoryOption = Annotated[
    Path | None,
    typer.Option("--repository", "-r", envvar="FORWARDPASS_REPOSITORY",
                 help="Model repository folder [default: the built-in demo repository]"),
]  # fmt: skip


def _repository(path: Path | None):
    from forwardpass import Repository

    return Repository(path or _demo_repository(notes=False))


@app.command()
def serve(
    repository: Annotated[Path | None, typer.Argument(help="Model repository [default: the built-in demo "
                                                      "repository, built on first use]")] = None,  # fmt: skip
    repository_option: Annotated[Path | None, typer.Option("--repository", "-r", help="The same as REPOSITORY "
                                                           "[env FORWARDPASS_REPOSITORY, when neither is given]")] = None,
    host: Annotated[str, typer.Option(envvar="FORWARDPASS_HOST", help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,  # no envvar: Kubernetes sets FORWARDPASS_PORT=tcp://...
    workers: Annotated[int, typer.Option(envvar="FORWARDPASS_WORKERS", help="Processes sharing the port")] = 1,
    poll_interval: Annotated[float, typer.Option(envvar="FORWARDPASS_POLL_INTERVAL", help="Seconds between "
                                                 "repository scans (0: no hot reload)")] = 2.0,  # fmt: skip
    model_control: Annotated[str, typer.Option(envvar="FORWARDPASS_MODEL_CONTROL",
                                               help="poll: load every model and follow the folder; explicit: load "
                                               "only --load-model, then what the repository API asks; none: load "
                                               "every model once, refuse repository changes")] = "poll",  # fmt: skip
    load_model: Annotated[list[str] | None, typer.Option(help="With --model-control explicit: a model to load at "
                                                         "start (repeatable; '*' for all)")] = None,  # fmt: skip
    http: Annotated[str, typer.Option(envvar="FORWARDPASS_HTTP", help="HTTP implementation: forwardpass (fastest) "
                                      "or uvicorn")] = "forwardpass",  # fmt: skip
    log_level: Annotated[str, typer.Option(help="Log level")] = "info",
    api_key_file: Annotated[Path | None, typer.Option(help="Inference keys, one per line: with any key set, every "
                                                      "route but /v2/health/* needs 'Authorization: Bearer KEY' or "
                                                      "'x-api-key: KEY' "
                                                      "[env FORWARDPASS_API_KEY_FILE]")] = None,  # fmt: skip
    admin_key_file: Annotated[Path | None, typer.Option(help="The admin key (repository load, unload, index) "
                                                        "[env FORWARDPASS_ADMIN_KEY_FILE]")] = None,  # fmt: skip
    api_key: Annotated[str | None, typer.Option(help="One inference key (visible in `ps`: prefer --api-key-file "
                                                "or FORWARDPASS_API_KEY)")] = None,  # fmt: skip
    public_metrics: Annotated[bool, typer.Option("--public-metrics", help="/metrics without a key when keys are "
                                                 "set")] = False,  # fmt: skip
    keys_file: Annotated[Path | None, typer.Option(help="keys.yaml: keys with tiers (forwardpass keys create) "
                                                   "[default: $FORWARDPASS_HOME/keys.yaml if it exists; env "
                                                   "FORWARDPASS_KEYS_FILE]")] = None,  # fmt: skip
    tiers_file: Annotated[Path | None, typer.Option(help="tiers.yaml: each tier's limits, and prices [env "
                                                    "FORWARDPASS_TIERS_FILE]")] = None,  # fmt: skip
    require_api_key: Annotated[bool, typer.Option("--require-api-key", help="Refuse requests without a key (keys "
                                                  "are optional on loopback otherwise: a request without one is "
                                                  "'anonymous')")] = False,  # fmt: skip
    state_dir: Annotated[Path | None, typer.Option(help="Usage (usage.sqlite) and shared rate limits [default: "
                                                   "$FORWARDPASS_HOME/state]")] = None,  # fmt: skip
    ray: Annotated[bool, typer.Option("--ray", help="Serve on Ray Serve: a deployment per model, scaled as its "
                                      "model.yaml's scale: section says (a local Ray cluster by default)")] = False,
    ray_address: Annotated[str | None, typer.Option(help="With --ray: an existing Ray cluster's address")] = None,
) -> None:
    """Serve a model repository over HTTP: Open Inference Protocol V2, the OpenAI-compatible API for language
    models (/v1/chat/completions, /v1/completions), /v1 predict, /metrics.

    Without a repository it serves the built-in demo repository (built on first use)."""
    require("httptools", "server", "forwardpass serve")
    from forwardpass.server.auth import Keys
    from forwardpass.server.config import ServeConfig
    from forwardpass.server.run import serve as run_server

    if repository is not None and repository_option is not None and repository != repository_option:
        raise ForwardpassError(f"two repositories given ({repository} and --repository {repository_option}); pass one")
    # FORWARDPASS_REPOSITORY (a container image's default) yields to a repository given on the command line
    from_env = os.environ.get("FORWARDPASS_REPOSITORY")
    repo = repository or repository_option or (Path(from_env) if from_env else None) or _demo_repository()
    try:
        config = ServeConfig.from_env(repository=repo, host=host, port=port, workers=workers,
                                      poll_interval=poll_interval, http=http, api_key=api_key,
                                      api_key_file=api_key_file, admin_key_file=admin_key_file,
                                      public_metrics=public_metrics or None, model_control=model_control,
                                      load_model=load_model or None, keys_file=keys_file, tiers_file=tiers_file,
                                      require_api_key=require_api_key or None, state_dir=state_dir)  # fmt: skip
    except ValueError as exc:  # pydantic's ValidationError: a bad option value or FORWARDPASS_* variable
        raise ForwardpassError(_settings_error(exc)) from None
    Keys.from_config(config)  # unreadable key, keys.yaml or tiers.yaml files fail here, with one line
    if ray or ray_address:
        from forwardpass.server import ray_serve

        ray_serve.run(config, ray_address)
        return
    try:
        run_server(config, log_level)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise ForwardpassError(f"{config.host}:{config.port} is already in use (another server?); "
                               "stop it or pass --port") from None  # fmt: skip


def _demo_repository(rebuild: bool = False, notes: bool = True) -> Path:
    """The demo repository (built on first use, saying what it builds), and a line for each model it lacks."""
    from forwardpass import demo as demo_pkg

    def say(line: str) -> None:
        err.print(f"building the demo repository: {escape(line)}", highlight=False, soft_wrap=True)

    path = demo_pkg.build(demo_pkg.home() / "demo", say) if rebuild else demo_pkg.repository(progress=say)
    for line in demo_pkg.left_out() if notes else []:
        err.print(f"[yellow]note:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    return path


def _settings_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = [f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']} (got {e.get('input')!r})"
             for e in errors()]  # fmt: skip
    return "; ".join(parts)


@app.command()
def demo(
    samples: Annotated[Path | None, typer.Option(help="Also write held-out sample inputs into this folder")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build the demo repository again")] = False,
) -> None:
    """Build the built-in demo repository (once) and list its models."""
    from forwardpass import Repository
    from forwardpass import demo as demo_pkg

    path = _demo_repository(rebuild)
    out.print(f"demo repository: {path}")
    _models_table(Repository(path))
    if samples is not None:
        files = demo_pkg.write_samples(samples)
        out.print(f"wrote {len(files)} sample inputs to {samples}/ (try: forwardpass predict digits {files[3]})")


@app.command()
def models(repository: RepositoryOption = None) -> None:
    """List models, their versions and status (each is loaded to check it)."""
    _models_table(_repository(repository))


def _models_table(repo: Any) -> None:
    repo.load_all()
    table = Table("model", "version", "status", "task", "held-out")
    problems = []
    for status in repo.status():
        try:
            config = repo.config(status.name)
            task, metrics = config.task, _metrics(config.metrics)
        except ForwardpassError as exc:
            task, metrics = "?", ""
            problems.append(f"{status.name}: {exc}")
        if status.reason:
            problems.append(f"{status.name} v{status.version}: {status.reason}")
        table.add_row(status.name, str(status.version), status.state, task, metrics)
    out.print(table)
    for problem in dict.fromkeys(problems):
        err.print(f"[red]{escape(problem)}[/red]", highlight=False, soft_wrap=True)


def _metrics(metrics: dict[str, float]) -> str:
    short = {"accuracy": "acc", "interval_coverage_0.9": "cover90"}
    shown = {short.get(k, k): v for k, v in metrics.items() if k != "eval_rows"}
    return " ".join(f"{k}={v:.3g}" for k, v in shown.items())


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="Model name")],
    inputs: Annotated[list[str], typer.Argument(help="JSON object/list or file (.json, .jsonl, .csv), image or WAV "
                                                "file, or text; '-' reads JSON from stdin")],  # fmt: skip
    repository: RepositoryOption = None,
    version: Annotated[int | None, typer.Option(help="Model version [default: newest]")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Labels to show per prediction")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Predict with a model: prints labels with probabilities, or values with intervals."""
    from forwardpass.embedded import Embedded

    repo = _repository(repository)
    loaded = repo.load(model, version)
    instances, names = _read_inputs(inputs, loaded.config.pre.kind, text=loaded.pre.text)
    with Embedded(repo) as engine:  # the path a server request takes: the same checks, the same errors
        engine.serve(loaded)
        answers = engine.predict(model, instances, version=loaded.version, top_k=top_k)
    if as_json:
        out.print_json(json.dumps(_jsonable(answers)))
    elif isinstance(answers, dict):  # tensors out (no post-processing): {output: rows}
        for name, rows in answers.items():
            array = np.asarray(rows)
            out.print(f"{name} {list(array.shape)} {array.dtype}:\n{array}")
    else:
        _answers_table(names, answers)


@app.command()
def stream(
    model: Annotated[str, typer.Argument(help="Model name")],
    input: Annotated[Path | None, typer.Option("--input", help="An audio file: print the speech segments a "
                                                "voice activity model finds, chunk by chunk")] = None,  # fmt: skip
    source: Annotated[str | None, typer.Option(help="redis://HOST:PORT/STREAM to read events from")] = None,
    group: Annotated[str, typer.Option(help="Redis consumer group (created when missing)")] = "forwardpass",
    consumer: Annotated[str | None, typer.Option(help="This worker's consumer name [default: host-pid]")] = None,
    sink: Annotated[str | None, typer.Option(help="redis://HOST:PORT/STREAM to write results to")] = None,
    dead_letter: Annotated[str | None, typer.Option("--dead-letter", help="Stream for events that failed "
                                                    "--max-deliveries times [default: SOURCE:dead]")] = None,  # fmt: skip
    batch_size: Annotated[int, typer.Option(help="Events read and run together")] = 256,
    max_deliveries: Annotated[int, typer.Option(help="Deliveries before an event goes to the dead letters")] = 3,
    claim_idle_ms: Annotated[int, typer.Option(help="Take over another consumer's events pending this long")] = 30_000,
    metrics_port: Annotated[int | None, typer.Option(help="Serve the worker's Prometheus metrics on this port")] = None,
    repository: RepositoryOption = None,
) -> None:
    """Stream inference: events from a Redis stream to a sink stream (at least once), or an audio file's voice
    activity segments."""
    repo = _repository(repository)
    if input is not None:
        from forwardpass.streaming.vad import file_segments

        for segment in file_segments(repo, model, input):
            out.print(f"speech {segment.start:8.3f} s - {segment.end:8.3f} s")
        return
    if source is None or sink is None:
        raise ForwardpassError("give --input FILE, or --source redis://HOST:PORT/STREAM and --sink redis://.../STREAM")
    from forwardpass.streaming.redis import Worker, WorkerOptions

    options = WorkerOptions(source=source, sink=sink, group=group, consumer=consumer, dead_letter=dead_letter,
                            batch_size=batch_size, max_deliveries=max_deliveries, claim_idle_ms=claim_idle_ms,
                            metrics_port=metrics_port)  # fmt: skip
    Worker(repo, model, options).run()


@app.command()
def batch(
    model: Annotated[str, typer.Argument(help="Model name")],
    input: Annotated[str, typer.Argument(help="Parquet, CSV, JSONL, a .txt of prompts, or a folder/glob of images")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (part files + manifest)")],
    repository: RepositoryOption = None,
    engine: Annotated[str, typer.Option(help="local (threads on this machine) or ray")] = "local",
    fmt: Annotated[str, typer.Option("--format", help="parquet, csv or jsonl")] = "parquet",
    batch_size: Annotated[int | None, typer.Option(help="Rows per forward pass [default: by input kind]")] = None,
    chunk_rows: Annotated[int | None, typer.Option(help="Rows per part file (the unit of resuming)")] = None,
    id_column: Annotated[list[str] | None, typer.Option(help="Input column(s) carried into the output")] = None,
    max_errors: Annotated[int | None, typer.Option(help="Abort when more rows than this fail")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Also write the k best labels and probabilities")] = 0,
    max_tokens: Annotated[int, typer.Option(help="Generation models: tokens per completion")] = 64,
    ray_address: Annotated[str | None, typer.Option(help="An existing Ray cluster [default: a local one]")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs for the local Ray cluster")] = None,
) -> None:
    """Score a large file: streamed in chunks, resumable after a crash, bad rows to _errors.jsonl."""
    from forwardpass import batch as batch_pkg

    summary = batch_pkg.run(model, input, output, engine=engine, fmt=fmt, batch_size=batch_size, chunk_rows=chunk_rows,
                            id_columns=id_column, max_errors=max_errors, top_k=top_k, max_tokens=max_tokens,
                            repository=repository, ray_address=ray_address,
                            num_cpus=num_cpus, progress=True)  # fmt: skip
    resumed = f", {summary.resumed_parts} parts from an earlier run" if summary.resumed_parts else ""
    if summary.redone:
        resumed += f", {len(summary.redone)} parts redone (missing or changed since committed)"
    out.print(f"{summary.rows_ok:,} rows ok, {summary.rows_failed:,} failed, {summary.seconds:.1f} s, "
              f"{summary.rows_per_second:,.0f} rows/s -> {summary.output}{resumed}")  # fmt: skip
    for why in summary.redone[:10]:
        out.print(f"redone: {why}", highlight=False, soft_wrap=True)
    if summary.rows_failed and summary.errors_file:
        out.print(f"errors: {summary.errors_file}")


@app.command()
def drift(
    model: Annotated[str, typer.Argument(help="Model name")],
    data: Annotated[list[str], typer.Argument(help="Files of instances: .csv, .json, .jsonl, .parquet; images")],
    repository: RepositoryOption = None,
    version: Annotated[int | None, typer.Option(help="Model version [default: newest]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Compare a file of inputs with the data the model was built on: PSI and KS per feature, prediction drift.
    Exits 1 when the drift is significant (model.yaml drift.significant), so a scheduled job can alert."""
    from forwardpass.monitoring.drift import monitor_for

    repo = _repository(repository)
    loaded = repo.load(model, version)
    monitor = monitor_for(loaded)
    if monitor is None:
        raise ForwardpassError(f"{model} v{loaded.version} has no drift reference ({loaded.folder}/{loaded.version}/"
                               "reference.json): forwardpass import sklearn writes one from the training rows; "
                               "or model.yaml sets drift.enabled false, or the model has several inputs")  # fmt: skip
    parquet = [p for p in data if p.lower().endswith((".parquet", ".pq"))]
    instances, _ = _read_inputs([p for p in data if p not in parquet], loaded.config.pre.kind, text=loaded.pre.text)
    for path in parquet:
        instances += require("pyarrow.parquet", "batch", "reading Parquet").read_table(path).to_pylist()
    if not instances:
        raise ForwardpassError("no instances in " + ", ".join(data))

    def batches() -> Any:  # the model's own pre-processing and forward pass, 1024 instances at a time
        for start in range(0, len(instances), 1024):
            feeds = loaded.prepare(instances[start : start + 1024])
            outputs = loaded.run(feeds) if monitor.output else {}
            yield feeds[monitor.input_name], outputs.get(monitor.output) if monitor.output else None

    report = monitor.judge(batches())
    if as_json:
        out.print_json(json.dumps(report))
    else:
        table = Table("feature", "PSI", "KS", "KS p-value", "status")
        for f in report["features"]:
            table.add_row(f["name"], _number(f["psi"]), _number(f["ks"]), _number(f["ks_p_value"]), f["status"])
        if report["prediction"] is not None:
            table.add_row("(predictions)", _number(report["prediction"]["psi"]), "", "", report["prediction"]["status"])
        out.print(table)
        limits = report["thresholds"]
        out.print(f"{model} v{loaded.version}: {report['rows']} rows against {report['reference_rows']} reference rows: "
                  f"[bold]{report['status']}[/bold] (max PSI {_number(report['max_psi'])}; moderate from "
                  f"{limits['moderate']}, significant from {limits['significant']})")  # fmt: skip
    if report["status"] == "drifting":
        raise typer.Exit(1)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _read_inputs(args: list[str], pre_kind: str, *, text: bool) -> tuple[list[Any], list[str]]:
    instances: list[Any] = []
    names: list[str] = []

    def add(items: list[Any], label: str) -> None:
        instances.extend(items)
        names.extend([label] if len(items) == 1 else [f"{label}[{i}]" for i in range(len(items))])

    for arg in args:
        path = Path(arg)
        if arg == "-":
            add(_json_items(sys.stdin.read(), "stdin"), "stdin")
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".json":
                add(_json_items(path.read_text(encoding="utf-8"), arg), path.name)
            elif suffix == ".jsonl":
                lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
                add([_json_value(ln, f"{arg} line {i + 1}") for i, ln in enumerate(lines)], path.name)
            elif suffix == ".csv":
                with path.open(newline="", encoding="utf-8") as f:
                    add(list(csv.DictReader(f)), path.name)
            elif suffix == ".txt" and text:
                add([path.read_text(encoding="utf-8")], path.name)
            else:
                add([path.read_bytes()], path.name)  # images, audio: the model's pre-processing decodes them
        elif arg.lstrip()[:1] in ("{", "["):
            add(_json_items(arg, "argument"), _clip(arg))
        elif text:
            add([arg], _clip(arg))
        else:
            raise ForwardpassError(f"input {arg!r} is not a file, and not JSON (this model's pre-processing is "
                                   f"'{pre_kind}', so plain text is not an input)")  # fmt: skip
    return instances, names


def _json_value(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ForwardpassError(f"{where}: not valid JSON ({exc})") from None


def _json_items(text: str, where: str) -> list[Any]:
    value = _json_value(text, where)
    # a list of rows is many instances; a list of numbers is one row
    many = isinstance(value, list) and (not value or isinstance(value[0], (dict, list)))
    return value if many else [value]


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _answers_table(names: list[str], answers: list[dict[str, Any]]) -> None:
    first = answers[0]
    if "label" in first:
        table = Table("input", "label", "probability", "top-k")
        for name, a in zip(names, answers):
            top = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in a["top_k"])
            table.add_row(name, str(a["label"]), f"{a['probability']:.3f}", top)
    else:
        has_interval = "low" in first
        table = Table("input", "value", *([f"{first['level']:.0%} interval"] if has_interval else []))
        for name, a in zip(names, answers):
            extra = [f"[{a['low']:.4g}, {a['high']:.4g}]"] if has_interval else []
            table.add_row(name, f"{a['value']:.4g}", *extra)
    out.print(table)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Answers):
        return value.to_list()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


@import_app.command("gguf")
def import_gguf(
    file: Annotated[Path, typer.Argument(help="A GGUF language model (llama family; Q4_1 linears, Q8_0 embeddings)")],
    name: Annotated[str, typer.Option(help="Model name in the repository")],
    repository: RepositoryOption = None,
    accuracy_level: Annotated[int, typer.Option(help="MatMulNBits activations: 4 = int8 (fast), 0 = fp32 (exact)")] = 4,
    max_context: Annotated[int, typer.Option(help="Context length to allocate the KV cache for")] = 2048,
    prefill_accuracy_level: Annotated[int | None, typer.Option(help="A second graph for prompts: 1 = fp32 activations "
                                                               "(faster for many rows on AVX2-only CPUs, a second copy "
                                                               "of the weights); default: none")] = None,  # fmt: skip
    kernels: Annotated[str, typer.Option(help="The Q4_1 linears and attention: forwardpass (its own kernels, built "
                                         "here with the C compiler), onnxruntime (ONNX Runtime's operators only), "
                                         "or auto: forwardpass where they build")] = "auto",  # fmt: skip
) -> None:
    """Convert a GGUF language model into an ONNX decoder model folder (no code runs from the file)."""
    from forwardpass.convert.gguf import import_gguf as convert
    from forwardpass.convert.gguf_decoder import KERNELS

    if kernels not in ("auto", *KERNELS):
        raise typer.BadParameter(f"{kernels!r}; expected auto, {', '.join(KERNELS)}", param_hint="--kernels")
    folder = convert(file, name, repository or _default_path(), accuracy_level=accuracy_level, max_context=max_context,
                     prefill_accuracy_level=prefill_accuracy_level, kernels=kernels)  # fmt: skip
    out.print(f"imported {file} as {folder}")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A generation model")],
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message, unless --raw)")],
    repository: RepositoryOption = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
    top_k: Annotated[int, typer.Option(help="0 = off")] = 0,
    top_p: Annotated[float, typer.Option()] = 0.95,
    min_p: Annotated[float, typer.Option()] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Same seed and prompt, same text")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this text (repeatable)")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template")] = False,
) -> None:
    """Stream a completion to the terminal, then tokens/s."""
    request: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                               "min_p": min_p, "seed": seed, "stop": stop or None}  # fmt: skip
    target = {"prompt": prompt} if raw else {"messages": [{"role": "user", "content": prompt}]}
    with _generator(model, repository) as engine:
        _stream(engine, model, {**target, **request}, chat=not raw)


def _stream(engine: Any, model: str, doc: dict[str, Any], chat: bool) -> str:
    """One generation through the engine (the OpenAI routes' checks and path), printed as it comes."""
    import time

    from forwardpass.engine import parse_generation

    start, pieces, n = time.perf_counter(), [], 0
    for item in engine.stream(model, parse_generation(doc, chat)):
        if isinstance(item, str):
            pieces.append(item)
            sys.stdout.write(item)
            sys.stdout.flush()
        else:  # the Generation: how many tokens were sampled
            n = item.completion_tokens
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    sys.stdout.flush()
    err.print(f"[dim]{n} token{'' if n == 1 else 's'} in {seconds:.2f} s, "
              f"{n / seconds if seconds else 0:.1f} tokens/s[/dim]")  # fmt: skip
    return "".join(pieces)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="A generation model")],
    repository: RepositoryOption = None,
    system: Annotated[str | None, typer.Option(help="A system message")] = None,
    max_tokens: Annotated[int, typer.Option()] = 512,
    temperature: Annotated[float, typer.Option()] = 0.7,
    seed: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Chat in the terminal; the conversation is kept until you type /exit (or end the input)."""
    with _generator(model, repository) as engine:
        _chat(engine, model, system, {"max_tokens": max_tokens, "temperature": temperature, "seed": seed})


def _chat(engine: Any, model: str, system: str | None, sampling: dict[str, Any]) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> ") if interactive else input()
        except EOFError:
            break
        if not interactive:  # piped: show each prompt on its own line, as a terminal would
            sys.stdout.write(f"you> {line}\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        reply = _stream(engine, model, {"messages": messages, **sampling}, chat=True)
        messages.append({"role": "assistant", "content": reply})


def _generator(name: str, repository: Path | None) -> Any:
    """The embedded engine serving one language model (its continuous-batching scheduler, as a server would)."""
    from forwardpass.embedded import Embedded

    repo = _repository(repository)
    config = repo.config(name)
    if not generative(config):
        raise ForwardpassError(f"model '{name}' is a {config.task} model; generate and chat need a generation "
                               "model (forwardpass import gguf ...)")  # fmt: skip
    return Embedded(repo, load=[name])


@import_app.command("sklearn")
def import_sklearn(
    file: Annotated[Path, typer.Argument(help="A pickled or joblib scikit-learn estimator or pipeline")],
    name: Annotated[str, typer.Option(help="Model name in the repository")],
    trust: Annotated[bool, typer.Option(help="Allow unpickling FILE (it can run code: only for files you trust)")] = False,
    repository: RepositoryOption = None,
    features: Annotated[str | None, typer.Option(help="Comma-separated feature names [default: from the estimator]")] = None,
    calibration: Annotated[Path | None, typer.Option(help="Held-out CSV for a regressor's conformal interval")] = None,
    target: Annotated[str | None, typer.Option(help="Target column in the calibration CSV")] = None,
    level: Annotated[float, typer.Option(help="Interval coverage for regressors")] = 0.9,
) -> None:
    """Convert a scikit-learn estimator (with skl2onnx) into a model folder."""
    from forwardpass.convert.sklearn import import_sklearn_file

    repo = repository or _default_path()
    feature_names = [f.strip() for f in features.split(",")] if features else None
    kwargs: dict[str, Any] = {"feature_names": feature_names, "level": level}
    if calibration is not None:
        if target is None:
            raise ForwardpassError("--calibration needs --target naming the target column")
        kwargs["X_calib"], kwargs["y_calib"], kwargs["feature_names"] = _calibration(calibration, target, feature_names)
    folder = import_sklearn_file(file, name, repo, trust=trust, **kwargs)
    out.print(f"imported {file} as {folder}")


def _calibration(path: Path, target: str, names: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or target not in rows[0]:
        raise ForwardpassError(f"{path}: no column '{target}'")
    names = names or [k for k in rows[0] if k != target]
    try:
        X = np.array([[float(r[n]) for n in names] for r in rows])
        y = np.array([float(r[target]) for r in rows])
    except (KeyError, ValueError) as exc:
        raise ForwardpassError(f"{path}: calibration rows must be numeric with columns {names}: {exc}") from None
    return X, y, names


@app.command()
def optimize(
    model: Annotated[str, typer.Argument(help="A classification, regression or language model in the repository")],
    repository: RepositoryOption = None,
    quantize: Annotated[list[str] | None, typer.Option(help="dynamic-int8, static-int8, static-int8-entropy, "
                                                      "int4 or fp16 (a language model: int8 or fp32); repeat for "
                                                      "several [default: all]")] = None,
    prune: Annotated[list[float] | None, typer.Option(help="Remove this fraction of each dense hidden layer's units "
                                                      "(0.5 = half), next layer refitted; repeat for several")] = None,
    distill: Annotated[list[str] | None, typer.Option(help="Train a student with these hidden layer sizes (64, or "
                                                      "32,16; 0: linear) on its outputs; repeat for several")] = None,
    graph: Annotated[bool, typer.Option("--graph", help="ONNX Runtime's graph optimizations saved offline "
                                                         "[default: with all quantizations]")] = False,  # fmt: skip
    eval_data: Annotated[Path | None, typer.Option("--eval", help="Validation rows: .npz (X, y) or .csv with the "
                                                   "feature columns and a label column; a language model: a .txt "
                                                   "[default: the demo's held-out split]")] = None,  # fmt: skip
    max_accuracy_drop: Annotated[float, typer.Option(help="The guard: largest accepted drop (0.01 = one point)")] = 0.01,
    promote: Annotated[bool, typer.Option("--promote", help="Serve the recommended variant (version policy)")] = False,
    rounds: Annotated[int, typer.Option(help="Interleaved timing rounds")] = 5,
) -> None:
    """Cheaper variants of a model as new versions, measured side by side, guarded, one recommended."""
    from forwardpass.optimize import optimize as run
    from forwardpass.optimize.distill import method_name

    methods = list(quantize or ()) + [f"prune-{round(f * 100)}" for f in prune or ()]
    methods += [method_name(d) for d in distill or ()] + (["graph"] if graph else [])
    from rich.progress import Progress

    with Progress(console=err, transient=False) as bars:
        tasks: dict[str, Any] = {}

        def show(stage: str, done: int, total: int) -> None:  # one bar per stage (the stage's name before "(")
            key = stage.split(" (")[0]
            if key not in tasks:
                tasks[key] = bars.add_task(key, total=total)
            bars.update(tasks[key], completed=done, description=escape(stage))

        report = run(repository or _default_path(), model, methods or None, data=eval_data, max_drop=max_accuracy_drop,
                     promote=promote, rounds=rounds, progress=show)  # fmt: skip
    out.print((report.folder / "report.md").read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)


def _default_path() -> Path:
    from forwardpass import default_repository

    return default_repository()


def main() -> None:
    """Entry point: domain errors become one red line and exit code 2, never a traceback."""
    try:
        app()
    except ForwardpassError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
