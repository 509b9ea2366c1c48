"""A loaded model version: pre-processing, the forward pass on its runtime (ONNX Runtime by default), post-processing."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

from forwardpass.config import ModelConfig, TensorSpec
from forwardpass.errors import ForwardpassError, InvalidInput, ModelConfigError, ModelLoadError
from forwardpass.pipeline import Plan, Preprocessor, build_post, build_pre
from forwardpass.runtime import Runtime, TensorInfo, open_runtime
from forwardpass.runtime.onnx import ort_message
from forwardpass.tensors import TensorCheck


class Model:
    """One version of a model, ready to predict.

    Usage::

        model = forwardpass.load("breast-cancer")
        model.predict({"mean radius": 17.99, ...})      # one row -> one answer
        model.predict(rows)                              # a list -> a list of answers
        model.predict(np.zeros((8, 30), np.float32))     # input tensors skip pre-processing
        model.run({"input": x})                          # raw forward pass -> {output: array}
    """

    def __init__(self, name: str, version: int, config: ModelConfig, folder: Path, runtime: Runtime | None = None):
        self.name, self.version, self.config, self.folder = name, version, config, folder
        file = str(folder / "model.yaml")
        if runtime is None:
            runtime = open_runtime(config, folder, version)  # model.yaml's runtime: (runtime/__init__.py)
        self.runtime = runtime
        self.inputs = reconcile(config.inputs, runtime.inputs, "inputs", file)
        self.outputs = reconcile(config.outputs, runtime.outputs, "outputs", file)
        self.labels = _labels(config.labels, folder, file)
        try:
            self._pre = build_pre(config.pre, self.inputs, folder)
        except ModelConfigError as exc:  # pre-processors know the field, not the file
            if exc.file != "model.yaml":
                raise
            raise ModelConfigError(file, exc.loc, exc.msg, exc.fix) from None
        infos = [TensorInfo(s.name, s.datatype, tuple(s.shape)) for s in self.outputs]
        self._post = build_post(config.post, infos, self.labels, file)  # type: ignore[arg-type]
        self._specs = {s.name: s for s in self.inputs}
        guarded = runtime.guarded  # checked inside the runtime (ONNX: in the graph, see runtime/guard.py)
        self._checks = {
            s.name: TensorCheck(s.name, s.datatype, s.shape, allow_nan=s.allow_nan or s.name in guarded)
            for s in self.inputs
        }
        self._output_names = [s.name for s in self.outputs]
        one = self.inputs[0] if len(self.inputs) == 1 else None
        self._single_input = one
        # the fast path: one input whose first dim is the batch, and a post-processor giving Answers
        batched = one is not None and one.shape[:1] == [-1] and self._post.output_names is not None
        self._fast = self._checks[one.name] if batched else None  # type: ignore[union-attr]
        self._run_post = runtime.prepare(self._post.output_names or self._output_names)

    def __repr__(self) -> str:
        return f"<Model {self.name} v{self.version} {self.config.task}>"

    # -- the data path ---------------------------------------------------------------------------

    def predict(self, data: Any, *, top_k: int | None = None) -> Any:
        """Pre-process, run, post-process. One instance in -> one answer out; a list -> a list.

        Instances are whatever model.yaml's pre-processing takes (feature objects, image bytes,
        strings, WAV bytes); numpy arrays (or a mapping of input name to array) are input tensors
        and skip pre-processing.
        """
        fast = self._fast
        if fast is not None and type(data) is np.ndarray:
            # The hot path (one input tensor, batch first), written flat on purpose: beside a 20 us
            # forward pass every Python call and numpy call shows (bench/engine.py).
            single = data.ndim == fast.rank - 1
            try:
                outputs = self._run_post({fast.name: fast(data[None] if single else data)})
            except (InvalidArgument, Fail) as exc:
                raise InvalidInput(("inputs",), f"the model rejected the inputs: {ort_message(exc)}") from None
            answers = self._post(outputs, top_k)
            return answers[0] if single else answers
        if _is_tensors(data):
            single, feeds = self._tensor_feeds(data)
        else:
            single = self._pre.is_single(data)
            instances = [data] if single else list(data)
            if not instances:
                raise InvalidInput(("instances",), "expected at least one instance, got an empty list")
            feeds = self._pre(instances)
        outputs = self._forward(self.check(feeds), self._post.output_names)
        answers = self._post(outputs, top_k)
        if single:
            return {k: v[0] for k, v in answers.items()} if isinstance(answers, dict) else answers[0]
        return answers

    @property
    def pre_kind(self) -> str:
        """The pre-processing model.yaml declares: tensor, tabular, image, text or audio."""
        return self.config.pre.kind

    @property
    def pre(self) -> Preprocessor:
        """The model's pre-processing (its traits: ``takes_raw``; ``plan`` for what a request costs)."""
        return self._pre

    def prepare(self, instances: Sequence[Any]) -> dict[str, np.ndarray]:
        """Pre-processing alone: a list of instances -> validated input tensors."""
        return self.plan(instances).run()

    def plan(self, instances: Sequence[Any]) -> Plan:
        """Pre-processing in two steps: bounds checked now (cheap: file headers, lengths), the work in
        ``run()``, which returns validated input tensors; ``off_loop`` says whether it is worth a thread.

            plan = model.plan(instances)   # InvalidInput past pre.max_pixels, max_seconds, ...
            feeds = await loop.run_in_executor(pool, plan.run) if plan.off_loop else plan.run()
        """
        if not instances:
            raise InvalidInput(("instances",), "expected at least one instance, got an empty list")
        plan = self._pre.plan(instances)
        return dataclasses.replace(plan, run=lambda: self.check(plan.run()))

    def postprocess(self, outputs: Mapping[str, np.ndarray], top_k: int | None = None) -> Any:
        """Post-processing alone: {output name: array} for a batch -> answers."""
        names = self._post.output_names or self._output_names
        return self._post([outputs[n] for n in names], top_k)

    def run(self, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The forward pass alone: validated input tensors -> {output name: array}."""
        names = list(outputs) if outputs is not None else self._output_names
        unknown = [n for n in names if n not in self._output_names]
        if unknown:
            raise InvalidInput(("outputs", unknown[0]), f"unknown output; the model has {self._output_names}")
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        return dict(zip(names, self._forward(self.check(feeds), names)))

    def check(self, feeds: Mapping[str, np.ndarray], filled: Collection[str] = ()) -> dict[str, np.ndarray]:
        """Validate input tensors against the model's inputs (names, datatypes, shapes, NaN). ``filled``: inputs
        the server feeds itself (a stateful model's state and control inputs), which a request must not send."""
        checks = self._checks
        if filled or feeds.keys() != checks.keys():
            sent = [k for k in feeds if k in filled]
            if sent:
                raise InvalidInput(("inputs", sent[0]), f"the server feeds this input itself (model.yaml's sequence: "
                                   f"section); send only {[k for k in checks if k not in filled]}")  # fmt: skip
            unknown = [k for k in feeds if k not in checks]
            if unknown:
                raise InvalidInput(("inputs", unknown[0]), f"unknown input; the model takes {list(checks)}")
            missing = [k for k in checks if k not in feeds and k not in filled]
            if missing:
                raise InvalidInput(("inputs", missing[0]), "missing input")
        return {name: checks[name](array) for name, array in feeds.items()}

    def _forward(self, feeds: dict[str, np.ndarray], names: Sequence[str] | None) -> list[np.ndarray]:
        try:
            return self.runtime.run(feeds, names)
        except (InvalidArgument, Fail) as exc:  # inputs that pass the checks but not a kernel (indices, broadcasts)
            raise InvalidInput(("inputs",), f"the model rejected the inputs: {ort_message(exc)}") from None
        except ForwardpassError:
            raise
        except Exception as exc:
            raise ForwardpassError(f"{self.name} v{self.version}: forward pass failed: {exc}") from exc

    def _tensor_feeds(self, data: Any) -> tuple[bool, dict[str, np.ndarray]]:
        if isinstance(data, np.ndarray):
            if self._single_input is None:
                raise InvalidInput(("inputs",), f"the model takes {len(self.inputs)} inputs "
                                   f"{list(self._specs)}: pass a mapping of input name to array")  # fmt: skip
            data = {self._single_input.name: data}
        feeds = {k: np.asarray(v) for k, v in data.items()}
        # one instance without its batch axis -> add it (only for models whose first dim is the batch)
        single = all(
            k in self._specs
            and self._specs[k].shape[:1] == [-1]
            and v.ndim == len(self._specs[k].shape) - 1
            for k, v in feeds.items()
        )
        if single:
            feeds = {k: v[None] for k, v in feeds.items()}
        return single, feeds




def _is_tensors(data: Any) -> bool:
    if isinstance(data, np.ndarray):
        return True
    return isinstance(data, Mapping) and bool(data) and all(isinstance(v, np.ndarray) for v in data.values())


def reconcile(
    declared: Sequence[TensorSpec] | None, actual: Sequence[TensorInfo], kind: str, file: str
) -> list[TensorSpec]:
    """Check model.yaml's inputs/outputs against the model file's; returns the merged specs.

    Where one side fixes a dimension and the other leaves it dynamic, the fixed size wins.
    """
    if declared is None:
        return [TensorSpec(name=a.name, datatype=a.datatype, shape=list(a.shape)) for a in actual]
    by_name = {a.name: a for a in actual}
    names = [d.name for d in declared]
    for i, spec in enumerate(declared):
        if spec.name not in by_name:
            raise ModelLoadError(f"{file}: {kind}[{i}] '{spec.name}' is not in the model; the model has {list(by_name)}")
    if kind == "inputs":
        missing = [a.name for a in actual if a.name not in names]
        if missing:
            raise ModelLoadError(f"{file}: the model needs input(s) {missing} that model.yaml does not declare")
    merged = []
    for i, spec in enumerate(declared):
        real = by_name[spec.name]
        where = f"{file}: {kind}[{i}] '{spec.name}'"
        if spec.datatype != real.datatype:
            raise ModelLoadError(f"{where} is declared {spec.datatype}, but the model has {real.datatype}; "
                                 f"set datatype: {real.datatype}")  # fmt: skip
        if len(spec.shape) != len(real.shape) or any(
            d != -1 and r != -1 and d != r for d, r in zip(spec.shape, real.shape)
        ):
            raise ModelLoadError(f"{where} is declared with shape {spec.shape}, but the model has "
                                 f"{list(real.shape)} (-1 = dynamic); set shape: {list(real.shape)}")  # fmt: skip
        shape = [d if d != -1 else r for d, r in zip(spec.shape, real.shape)]
        merged.append(spec.model_copy(update={"shape": shape}))
    return merged


def _labels(labels: list[str] | str | None, folder: Path, file: str) -> list[str] | None:
    if labels is None or isinstance(labels, list):
        return labels
    path = folder / labels
    if path.resolve().parent != folder.resolve():
        raise ModelConfigError(file, "labels", f"'{labels}' is outside the model folder", "name a file beside model.yaml")
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ModelConfigError(file, "labels", f"cannot read {path}: {exc.strerror}", "create the labels file") from None
