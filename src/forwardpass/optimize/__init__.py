"""`forwardpass optimize MODEL`: cheaper variants of a model, each checked by an accuracy guard, one recommended.

    from forwardpass.optimize import optimize
    report = optimize("models", "digits", methods=["dynamic-int8", "static-int8", "graph"], promote=True)
    report.recommended        # "dynamic-int8", say; report.rows: every variant with its numbers and verdict

1. The served version is the original. A ``latest`` version policy is pinned first (``specific: [v]``),
   so that the new versions do not get served before the guard has read them.
2. Each method (optimize/variants.py; ``prune-NN``: optimize/prune.py) writes its variant as the next
   version of the model, never over one. A method with nothing to change is reported, not written.
3. Every variant and the original are measured in the same run (optimize/measure.py):
   - latency p50/p99 at batch 1 and 32 and throughput, in interleaved rounds, one intra-op thread (how the
     server runs a small model);
   - quality on the validation rows: the demo's held-out split, or ``data`` (.npz with X and optionally y,
     or .csv with the model's feature columns and optionally a ``label`` column); without labels,
     agreement with the original.
4. The verdict against ``max_drop`` (absolute, 0.01 = one point):
   - rejected: the drop is over the limit;
   - flagged: the drop is within the limit, but its 95% interval reaches past it (too few rows to be sure);
   - accepted: otherwise.
5. Exactly one variant is recommended: the accepted one with the highest throughput at batch 32, when it is
   at least MIN_GAIN (1.10x) the original's; else the original. ``promote`` makes it the served version
   (``version_policy: {specific: [v]}``; hot reload picks it up).
6. The report (report.md, report.json and report.png, accuracy against latency) is written into
   ``<model>/optimize/``, with ONNX Runtime's floor (an Identity graph's call: no variant goes below it).
7. A language model imported from GGUF takes another path with the same verdicts and report
   (optimize/llm.py): int8 and fp32 rewrites of its 4-bit linears, judged by next-token agreement with fp32
   and perplexity on a held-out text.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from forwardpass import _cpu
from forwardpass._deps import require
from forwardpass.errors import ForwardpassError
from forwardpass.optimize import measure, variants
from forwardpass.optimize.variants import QUANTIZE, NotApplicable

__all__ = ["ALL", "QUANTIZE", "OptimizeReport", "Row", "optimize"]
DEMO_DATA = ("digits", "breast-cancer", "iris", "diabetes")
Progress = Callable[[str, int, int], None]  # (stage, done, total): a progress bar per stage
# a variant replaces the original only this much faster at batch 32: smaller gaps are within the timing noise
# of a shared 2-core machine (the same model measured 0.83-0.92M rows/s in different runs)
MIN_GAIN = 1.10


@dataclass
class Row:
    """One variant in the report."""

    variant: str
    version: int | None  # None: not written (not applicable, or failed)
    described: str
    size_bytes: int = 0
    p50_ms: dict[int, float] = field(default_factory=dict)
    p99_ms: dict[int, float] = field(default_factory=dict)
    throughput: float = 0.0  # rows/s at batch 32
    quality: dict[str, float | str] = field(default_factory=dict)
    verdict: str = ""  # accepted, flagged, rejected, not applicable
    interval: dict[str, float] = field(default_factory=dict)  # regression with a conformal interval: see _widened
    size_only: bool = False  # fp16 no faster than the original on this CPU: smaller on disk, that is all


@dataclass
class OptimizeReport:
    model: str
    original: int
    data: str
    rows: list[Row]
    recommended: str
    max_drop: float
    promoted: bool
    cpu: str
    folder: Path
    floor_ms: dict[int, float] = field(default_factory=dict)  # an Identity graph's p50 a call: ONNX Runtime's floor
    kind: str = "tabular"  # or "generation": a language model's report (optimize/llm.py)

    def row(self, variant: str) -> Row:
        return next(r for r in self.rows if r.variant == variant)


ALL = (*QUANTIZE, "prune-50", "prune-75", "distill-48", "distill-32", "distill-linear", "graph")


def optimize(repository: str | Path, name: str, methods: Sequence[str] | None = None, *,
             data: str | Path | None = None, max_drop: float = 0.01, promote: bool = False, rounds: int = 5,
             progress: Progress | None = None) -> OptimizeReport:  # fmt: skip
    """Make, measure and judge ``methods``' variants of model ``name`` (see the module docstring; None: ALL,
    or for a language model llm.METHODS)."""
    from forwardpass.repository import Repository

    say = progress or (lambda stage, done, total: None)
    if not 0 <= max_drop < 1:
        raise ForwardpassError(f"--max-accuracy-drop: {max_drop}; expected an absolute drop from 0 to 1 (0.01: a point)")
    repo = Repository(repository)
    config = repo.config(name)
    if config.task == "generation" and config.runtime.kind == "onnx":
        from forwardpass.optimize.llm import optimize_llm

        return optimize_llm(repo, name, config, methods, data=data, max_drop=max_drop, promote=promote, rounds=rounds,
                            say=say)  # fmt: skip
    methods = ALL if methods is None else methods
    for method in methods:
        variants.check(method)
    if config.task not in ("classification", "regression") or config.runtime.kind != "onnx":
        raise ForwardpassError(f"model '{name}' is a {config.task} model on {config.runtime.kind}: optimize takes "
                               "classification and regression models run by ONNX Runtime")  # fmt: skip
    served = repo.selected_versions(name, config)
    if not served:
        raise ForwardpassError(f"model '{name}' has no version to start from")
    original = served[-1]
    folder = repo.folder(name)
    X, y, calibration, source = _validation(name, data, config)
    _pin(folder, served)
    rows = [Row("original", original, f"version {original} as served", _size(folder / str(original)))]
    source_model = folder / str(original) / "model.onnx"
    sessions = {"original": _session(source_model)}
    for i, method in enumerate(methods):
        say(f"making variants ({method})", i, len(methods))
        target = _new_version(folder)
        try:
            described = variants.make(method, source_model, target / "model.onnx", calibration, config.task)
            session = _session(target / "model.onnx")  # refuses what ONNX Runtime cannot run
        except NotApplicable as exc:
            shutil.rmtree(target)
            rows.append(Row(method, None, str(exc), verdict="not applicable"))
            continue
        except Exception as exc:  # a quantizer's own failure on this graph: reported, the run goes on
            shutil.rmtree(target)
            rows.append(Row(method, None, f"failed: {type(exc).__name__}: {str(exc)[:300]}", verdict="not applicable"))
            continue
        rows.append(_variant_row(target, method, original, described))
        sessions[method] = session
    say("making variants", len(methods), len(methods))
    floor = _floor(sessions["original"])
    timings = measure.latency({**sessions, _FLOOR: floor} if floor is not None else sessions, X, rounds=rounds,
                              done=lambda r: say(f"timing {len(sessions)} models at batch 1 and 32", r, rounds))  # fmt: skip
    reference = measure.predictions(sessions["original"], X, config.task)
    conformal = _conformal(config)
    on_calibration = measure.predictions(sessions["original"], calibration, config.task) if conformal else None
    labels = config.labels if isinstance(config.labels, list) else []  # a file of labels: y is class indices
    for i, row in enumerate(rows):
        say(f"quality on {len(X)} rows", i, len(rows))
        if row.variant not in sessions:
            continue
        t = timings[row.variant]
        row.p50_ms, row.p99_ms, row.throughput = t.p50_ms, t.p99_ms, t.throughput(32)
        pred = measure.predictions(sessions[row.variant], X, config.task)
        q = measure.score(pred, reference, y, config.task, labels)
        row.quality = {"metric": q.metric, "value": q.value, "drop": q.drop, "low": q.low, "high": q.high}
        row.verdict = verdict(q.drop, q.high, max_drop)
        if conformal is not None and on_calibration is not None:
            mine = measure.predictions(sessions[row.variant], calibration, config.task)
            row.interval = _widened(conformal, mine, on_calibration, pred, y)
            if row.version is not None and row.variant != "original":
                _record(folder / str(row.version) / "variant.json", interval=row.interval)
    say(f"quality on {len(X)} rows", len(rows), len(rows))
    for row in rows:  # x86 CPUs without fp16 arithmetic run an fp16 graph through casts: it only saves disk
        row.size_only = row.variant == "fp16" and row.throughput < MIN_GAIN * rows[0].throughput
    return _conclude(OptimizeReport(name, original, source, rows, "original", max_drop, False, _cpu.describe(),
                                    folder / "optimize", timings[_FLOOR].p50_ms if _FLOOR in timings else {}),
                     folder, promote)  # fmt: skip


def verdict(drop: float, high: float, max_drop: float) -> str:
    """Rejected past the allowed drop; flagged when only its 95% interval reaches past it; else accepted."""
    return "rejected" if drop > max_drop else "flagged" if high > max_drop else "accepted"


def _new_version(folder: Path) -> Path:
    """A new, empty version folder numbered above every numbered folder (a leftover one without a model included)."""
    version = max(int(p.name) for p in folder.iterdir() if p.name.isascii() and p.name.isdigit()) + 1
    target = folder / str(version)
    target.mkdir()
    return target


def _variant_row(target: Path, method: str, original: int, described: str) -> Row:
    """The variant's variant.json written, and its row in the report."""
    (target / "variant.json").write_text(json.dumps({"method": method, "from_version": original,
                                                     "described": described}, indent=1))  # fmt: skip
    return Row(method, int(target.name), described, _size(target))


def _conclude(report: OptimizeReport, folder: Path, promote: bool) -> OptimizeReport:
    """The recommendation (the fastest accepted variant at least MIN_GAIN faster than the original, else the
    original), the promotion when asked, and the report written."""
    rows = report.rows
    rows[0].verdict = "accepted"
    accepted = [r for r in rows[1:] if r.verdict == "accepted" and r.throughput >= MIN_GAIN * rows[0].throughput]
    best = max(accepted, key=lambda r: r.throughput) if accepted else rows[0]
    report.recommended = best.variant
    if promote and best.variant != "original" and best.version is not None:
        _set_policy(folder, [best.version], conformal=best.interval.get("half_width"))
        report.promoted = True
    elif promote:  # the original stays: nothing to change, nothing to serve anew
        _set_policy(folder, [report.original])
    _write(report)
    return report


def _validation(name: str, data: str | Path | None,
                config: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, str]:  # fmt: skip
    """(evaluation rows, their labels or None, calibration rows, where they came from). Calibration (static
    quantization's ranges, pruning's importance and refit) never sees the rows a variant is judged on: the demo
    calibrates on its training split; a file's rows are split in two at random (seeded), half for each."""
    if data is not None:
        X, y, where = _read_rows(Path(data), config)
        if len(X) < 4:
            raise ForwardpassError(f"{data}: {len(X)} rows; give at least 4 (half calibrate, half evaluate)")
        order = np.random.default_rng(0).permutation(len(X))
        cal, ev = order[: len(X) // 2], order[len(X) // 2 :]
        return X[ev], (y[ev] if y is not None else None), X[cal], f"{where} ({len(ev)} of its {len(X)} rows)"
    if name in DEMO_DATA:
        from forwardpass.demo import datasets

        split = datasets.load(name)
        where = f"the demo's held-out split of {name} ({len(split.X_test)} rows; calibration on its training split)"
        return split.X_test.astype(np.float32), split.y_test, split.X_train.astype(np.float32), where
    raise ForwardpassError(f"model '{name}': give validation rows with --eval DATA (.npz with X and y, or .csv)")


def _read_rows(path: Path, config: Any) -> tuple[np.ndarray, np.ndarray | None, str]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            if "X" not in f:
                raise ForwardpassError(f"{path}: expected an array named X (and optionally y)")
            return np.asarray(f["X"], np.float32), (np.asarray(f["y"]) if "y" in f else None), str(path)
    if path.suffix == ".csv":
        pandas = require("pandas", "batch", "reading a CSV of validation rows")
        frame = pandas.read_csv(path)
        features = config.inputs[0].features or [c for c in frame.columns if c != "label"]
        missing = [c for c in features if c not in frame.columns]
        if missing:
            raise ForwardpassError(f"{path}: missing feature columns {missing[:5]}")
        y = frame["label"].to_numpy() if "label" in frame.columns else None
        return frame[features].to_numpy(np.float32), y, str(path)
    raise ForwardpassError(f"{path}: validation data is an .npz (X, y) or a .csv file")


def _session(path: Path) -> Any:
    from forwardpass.runtime.onnx import open_session

    return open_session(path, path, intra_op=1, inter_op=1, what="the variant")


_FLOOR = " floor"  # not a method name: the timings' key for the Identity graph


def _floor(original: Any) -> Any:
    """A one-node graph (Identity) on the original's input: what ONNX Runtime takes a call for no work at all,
    timed with the variants. A small model's call is mostly this, and no variant can go below it."""
    onnx = require("onnx", "optimize", "forwardpass optimize")
    from forwardpass.runtime.onnx import open_session

    spec = original.get_inputs()[0]
    if spec.type != "tensor(float)":
        return None
    shape = [d if isinstance(d, int) else None for d in spec.shape]
    value = onnx.helper.make_tensor_value_info(spec.name, onnx.TensorProto.FLOAT, shape)
    out = onnx.helper.make_tensor_value_info("copy", onnx.TensorProto.FLOAT, shape)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", [spec.name], ["copy"])], "floor", [value], [out])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return open_session(model.SerializeToString(), Path("floor.onnx"), intra_op=1, inter_op=1, what="the floor graph")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != "variant.json")


def _model_yaml(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "model.yaml").read_text(encoding="utf-8"))


def _conformal(config: Any) -> tuple[float, float] | None:
    """(level, half-width) of a regression model's split-conformal interval; None when it has none."""
    interval = getattr(config.post, "interval", None) if config.task == "regression" else None
    return None if interval is None or interval.conformal is None else (interval.level, interval.conformal)


def _widened(conformal: tuple[float, float], mine_cal: np.ndarray, original_cal: np.ndarray, mine: np.ndarray,
             y: np.ndarray | None) -> dict[str, float]:  # fmt: skip
    """A variant's interval: the original's half-width h plus the 99th percentile of |variant - original| on
    the calibration rows (never the rows it is judged on). Since |y - v| <= |y - o| + |o - v|, a value y
    inside the original's interval around o is inside the widened one around v whenever the variant is
    within that percentile of the original: coverage stays at about the level less 0.01 at worst. With
    labels, the coverage measured on the validation rows says how it came out."""
    level, h = conformal
    widen = float(np.quantile(np.abs(mine_cal - original_cal), 0.99))
    out = {"level": level, "original_half_width": h, "widened_by": widen, "half_width": h + widen}
    if y is not None:
        out["coverage"] = float((np.abs(np.asarray(y, np.float64) - mine) <= h + widen).mean())
    return out


def _record(path: Path, **fields: Any) -> None:
    """Fields added to a variant's variant.json."""
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc, indent=1))


def _set_policy(folder: Path, versions: list[int], conformal: float | None = None) -> None:
    """model.yaml's version_policy set to ``specific: versions`` (atomically: the watcher may be reading it),
    and the interval's conformal half-width to ``conformal`` when given (the served variant's, see _widened)."""
    doc = _model_yaml(folder)
    doc["version_policy"] = {"specific": versions}
    if conformal is not None and doc.get("post", {}).get("interval", {}).get("conformal") is not None:
        doc["post"]["interval"]["conformal"] = conformal
    tmp = folder / ".model.yaml.optimize"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, folder / "model.yaml")


def _pin(folder: Path, served: list[int]) -> None:
    """A ``latest`` policy would serve the new versions as they are written: pin what is served now."""
    policy = _model_yaml(folder).get("version_policy", {"latest": 1})
    if isinstance(policy, dict) and "latest" in policy:
        _set_policy(folder, served)


def _write(report: OptimizeReport) -> None:
    report.folder.mkdir(exist_ok=True)
    doc = {k: v for k, v in asdict(report).items() if k != "folder"}
    (report.folder / "report.json").write_text(json.dumps(doc, indent=1, default=str))
    (report.folder / "report.md").write_text(_markdown(report), encoding="utf-8")
    _plot(report, report.folder / "report.png")


def _markdown(r: OptimizeReport) -> str:
    if r.kind == "generation":
        from forwardpass.optimize.llm import markdown

        return markdown(r)
    metric = next((row.quality["metric"] for row in r.rows if row.quality), "quality")
    lines = [f"# forwardpass optimize: {r.model}", "",
             f"From version {r.original}; quality on {r.data}; CPU {r.cpu}; one intra-op thread; latency medians "
             f"and 99th percentiles over interleaved rounds. Guard: a drop of at most {r.max_drop:.3g} in {metric} "
             "(flagged when its 95% interval reaches past it).", "",
             "| variant | version | size KiB | p50 / p99 ms, batch 1 | p50 / p99 ms, batch 32 | rows/s at 32 | "
             f"{metric} | drop (95% interval) | verdict |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in r.rows:
        if not row.p50_ms:
            lines.append(f"| {row.variant} | – | – | – | – | – | – | – | {row.verdict}: {row.described} |")
            continue
        q = row.quality
        lines.append(f"| {row.variant} | {row.version} | {row.size_bytes / 1024:.1f} | {row.p50_ms[1]:.3f} / "
                     f"{row.p99_ms[1]:.3f} | {row.p50_ms[32]:.3f} / {row.p99_ms[32]:.3f} | {row.throughput:,.0f} | "
                     f"{q['value']:.4f} | {q['drop']:+.4f} ({q['low']:+.4f}, {q['high']:+.4f}) | "
                     f"{row.verdict}{' (size only: no faster on this CPU)' if row.size_only else ''} |")  # fmt: skip
    base = r.row("original")
    best = r.row(r.recommended)
    lines += ["", f"**Recommended: {r.recommended}**"
              + (f" (version {best.version}): {best.throughput / base.throughput:.2f}x the original's rows/s at "
                 f"batch 32, {metric} {best.quality['drop']:+.4f}." if r.recommended != "original" else
                 f": no accepted variant was {MIN_GAIN:.2f}x the original's rows/s at batch 32 or more; the original "
                 "stays.")]  # fmt: skip
    if r.recommended == "original" and not any(x.verdict == "accepted" for x in r.rows[1:]):
        lines.append("Nothing passed the guard.")
    lines.append(f"{'Promoted: it is the served version now.' if r.promoted else 'Not promoted (--promote serves it).'}")
    if r.floor_ms:
        lines.append(f"ONNX Runtime's floor, a one-node graph (Identity) on the same input: {r.floor_ms[1]:.3f} ms a "
                     f"call at batch 1, {r.floor_ms[32]:.3f} ms at 32, so no variant can be more than "
                     f"{base.p50_ms[32] / r.floor_ms[32]:.1f}x the original's rows/s at batch 32.")  # fmt: skip
    for row in r.rows[1:]:
        if row.version is not None:
            lines.append(f"- {row.variant}: {row.described}")
    if base.interval:
        level = base.interval["level"]
        lines += ["", f"Intervals ({level:.0%} split-conformal): each variant's half-width is the original's plus the "
                  "99th percentile of |variant - original| on the calibration rows; --promote writes the served "
                  "one into model.yaml.", "", "| variant | half-width | widened by | coverage on the validation rows |",
                  "|---|---|---|---|"]  # fmt: skip
        for row in r.rows:
            if row.interval:
                i = row.interval
                coverage = f"{i['coverage']:.3f}" if "coverage" in i else "– (no labels)"
                lines.append(f"| {row.variant} | {i['half_width']:.4g} | {i['widened_by']:.3g} | {coverage} |")
    return "\n".join(lines) + "\n"


def _plot(r: OptimizeReport, path: Path) -> None:
    matplotlib = require("matplotlib", "optimize", "drawing the optimize report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in r.rows if row.p50_ms]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    colors = {"accepted": "tab:green", "flagged": "tab:orange", "rejected": "tab:red"}
    batch = 32 if r.kind == "tabular" else 1  # a language model's: one decode step
    for row in measured:
        ax.scatter(row.p50_ms[batch], row.quality["value"], color=colors.get(row.verdict, "gray"),
                   marker="*" if row.variant == r.recommended else "o", s=160 if row.variant == r.recommended else 50)
        ax.annotate(row.variant, (row.p50_ms[batch], row.quality["value"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)  # fmt: skip
    ax.set_xlabel("median ms per call, batch 32" if batch == 32 else "median ms per decode step")
    ax.set_ylabel(str(measured[0].quality["metric"]))
    ax.set_title(f"{r.model}: quality against latency ({r.cpu})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
