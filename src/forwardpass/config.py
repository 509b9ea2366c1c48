"""The model.yaml schema: one pydantic model per concern, strict about unknown fields.

A minimal model.yaml::

    task: classification
    labels: [setosa, versicolor, virginica]
    inputs:
      - {name: input, datatype: FP32, shape: [-1, 4], features: [a, b, c, d]}
    pre: {kind: tabular}
    post: {kind: classification, output: probabilities, top_k: 3}

Everything else has a default; ``load_config(path)`` turns any mistake into a
ModelConfigError naming the file, the field and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, ValidationError, field_validator, model_validator
from pydantic_core import CoreSchema, PydanticCustomError

from forwardpass.errors import ModelConfigError
from forwardpass.tasks import TASKS
from forwardpass.tensors import Datatype


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_M = TypeVar("_M", bound=BaseModel)


class Feature(_Strict):
    """A named tabular feature; ``default`` fills it when a row leaves it out."""

    name: str
    default: float | None = None


class TensorSpec(_Strict):
    """One model input or output: V2 datatype and shape (-1 = any size)."""

    name: str
    datatype: Datatype
    shape: list[Annotated[int, Field(ge=-1)]]
    features: list[Feature] | None = None
    allow_nan: bool = False

    @field_validator("features", mode="before")
    @classmethod
    def _features_from_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _features_fit_shape(self) -> TensorSpec:
        if self.features is not None:
            if len(self.shape) != 2 or self.shape[1] not in (-1, len(self.features)):
                raise ValueError(
                    f"{len(self.features)} features need shape [-1, {len(self.features)}], got {self.shape}"
                )
            names = [f.name for f in self.features]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"feature names must be unique, repeated: {dupes}")
        return self


# --- pre-processing ---------------------------------------------------------------
# Each kind's schema lives beside its code (pipeline/kinds/<kind>.py) and is found by name in the
# registry there (pipeline/kinds/__init__.py); here is only what every kind's schema shares.


class PreOptions(_Strict):
    """The base of every pre-processing kind's model.yaml schema: ``kind`` names the kind.

    A kind subclasses it with ``kind: Literal["<name>"]`` and its own fields (pipeline/kinds/)::

        class ImagePre(PreOptions):
            kind: Literal["image"]
            resize: int | None = None
    """

    kind: str

    def check_inputs(self, inputs: list[TensorSpec] | None) -> None:
        """Raise ValueError when these fields contradict the declared inputs (None: taken from the ONNX file)."""
        wanted = getattr(self, "input", None)  # the input a kind fills, for kinds that let model.yaml name it
        names = [s.name for s in inputs or []]
        if wanted is not None and inputs is not None and wanted not in names:
            raise ValueError(f"pre.input '{wanted}' is not among the declared inputs {names}")


class _ByKind:
    """``pre:`` is validated by the schema of the kind it names: a union over the registry's kinds, tagged
    by ``kind``. Built when ModelConfig first validates (defer_build): the kinds import this module."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        from forwardpass.pipeline import kinds

        arms = tuple(kinds.schemas())
        return handler.generate_schema(Annotated[Union[arms], Field(discriminator="kind")])  # noqa: UP007


PreConfig = Annotated[PreOptions, _ByKind()]

# --- post-processing --------------------------------------------------------------


class ClassificationPost(_Strict):
    """Scores -> label, probability and top-k; softmax first when the output is logits."""

    kind: Literal["classification"]
    output: str | None = None  # defaults to 'probabilities', else the last float output
    logits: bool = False
    top_k: int = Field(3, ge=1)
    threshold: float | None = Field(None, gt=0, lt=1)  # binary: positive label when p >= threshold


class Interval(_Strict):
    """A prediction interval: split-conformal half-width, or two quantile outputs."""

    level: float = Field(gt=0, lt=1)
    conformal: float | None = Field(None, ge=0)  # half-width from calibration residuals
    low: str | None = None  # output holding the lower quantile
    high: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Interval:
        quantiles = self.low is not None or self.high is not None
        if quantiles and (self.low is None or self.high is None):
            raise ValueError("quantile intervals need both 'low' and 'high' outputs")
        if quantiles == (self.conformal is not None):
            raise ValueError("give either 'conformal' (a half-width) or 'low' and 'high' outputs, not both or none")
        return self


class RegressionPost(_Strict):
    """A value per row, with an interval when configured."""

    kind: Literal["regression"]
    output: str | None = None
    interval: Interval | None = None


class PassthroughPost(_Strict):
    """Raw output tensors, by name."""

    kind: Literal["passthrough"]


# --- embedding models (task: embedding; the pooling runs in forwardpass/embedding.py) ---


class EmbeddingPost(_Strict):
    """``post: {kind: embedding, pooling: mean, normalize: true}``: one vector per text, ``{"embedding": [...],
    "tokens": n}`` a row (the default post of ``task: embedding``).

    ``output`` is the encoder output to pool (default: its float output of rank 3, else rank 2): last hidden
    states [N, T, H] are pooled over the tokens the ``mask`` input marks (default: pre.attention_mask, else
    'attention_mask'): their mean, the last one, or the first (cls); an output already pooled [N, H] is taken
    as it is. ``normalize`` scales each vector to unit L2 length (cosine similarity = dot product). The pooling
    is part of the forward pass, so V2 infer answers the pooled vectors too.
    """

    kind: Literal["embedding"]
    pooling: Literal["mean", "cls", "last"] = "mean"
    normalize: bool = True
    output: str | None = None
    mask: str | None = None


PostConfig = Annotated[ClassificationPost | RegressionPost | PassthroughPost | EmbeddingPost, Field(discriminator="kind")]


# --- serving knobs ----------------------------------------------------------------


class Batching(_Strict):
    """Dynamic batching (used by the server's scheduler)."""

    max_batch_size: int = Field(64, ge=1)
    max_queue_delay_ms: float = Field(0.0, ge=0)
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = []
    max_queue_size: int = Field(1024, ge=1)
    timeout_ms: float | None = Field(None, gt=0)


class Cache(_Strict):
    """Response cache for identical requests."""

    enabled: bool = False
    max_bytes: int = Field(64 * 2**20, ge=0)


class Drift(_Strict):
    """Drift monitoring against the version's reference.json (monitoring/drift.py): on when that file exists."""

    enabled: bool = True
    window: int = Field(2048, ge=16, le=1_000_000)  # recent rows compared with the reference
    min_rows: int = Field(100, ge=1)  # fewer rows in the window: status 'unknown'
    moderate: float = Field(0.1, gt=0)  # PSI thresholds
    significant: float = Field(0.25, gt=0)


class PredictionLog(_Strict):
    """Sampled requests and their answers written to Parquet (monitoring/predictions.py): off unless rate > 0."""

    rate: float = Field(0.0, ge=0, le=1)  # the share of requests logged
    max_mb: float = Field(256, gt=0)  # the model's log folder is kept under this: the oldest files go first
    rows_per_file: int = Field(10_000, ge=1)  # a file is written when this many rows wait ...
    flush_seconds: float = Field(10.0, gt=0)  # ... or when the oldest waiting row is this old


class Scale(_Strict):
    """Replicas on Ray Serve (forwardpass serve --ray; server/ray_serve.py): autoscaled between the bounds on
    the requests each replica has in flight."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Scale:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is more than max_replicas ({self.max_replicas})")
        return self


class Threads(_Strict):
    """ONNX Runtime thread pools; 'auto' picks intra-op threads from the model's measured cost."""

    intra_op: int | Literal["auto"] = "auto"
    inter_op: int = Field(1, ge=0)
    # multi-threaded sessions: keep pool threads spinning between runs (ONNX Runtime's default:
    # lowest latency for a lone request) or stop them after each run (default here: under load
    # they would take the cores the server's event loop needs; see runtime/onnx.py)
    spinning: bool = False

    @field_validator("intra_op")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("intra_op must be 'auto', 0 (ONNX Runtime's default) or a positive count")
        return value


class RuntimeConfig(BaseModel):
    """Which runtime runs the forward pass (``runtime: onnx``, the default) and its own options.

    ``runtime: onnx`` is short for ``runtime: {kind: onnx}``; every other field belongs to the runtime,
    which reads it with ``options(Schema, file)``: ``runtime: {kind: remote, url: ..., model: ...}``.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str = "onnx"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @field_validator("kind")
    @classmethod
    def _known(cls, value: str) -> str:
        from forwardpass import runtime  # the registry (names only: nothing is imported for a name)

        if value not in runtime.names():
            raise ValueError(f"unknown runtime '{value}'; use one of {runtime.names()}")
        return value

    def options(self, schema: type[_M], file: str | Path) -> _M:
        """The runtime's own fields, validated by its schema; mistakes are ModelConfigErrors at runtime.<field>."""
        try:
            return schema.model_validate(self.model_extra or {})
        except ValidationError as exc:
            error = _config_error(Path(file), exc, known=list(schema.model_fields))
            raise ModelConfigError(error.file, f"runtime.{error.loc}".rstrip("."), error.msg, error.fix) from None


class LatestPolicy(_Strict):
    latest: int = Field(ge=1)


class SpecificPolicy(_Strict):
    specific: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)


VersionPolicy = Literal["all"] | LatestPolicy | SpecificPolicy

class StateSpec(_Strict):
    """A recurrent state: the model reads it from ``input`` and writes the next one to ``output``."""

    input: str
    output: str
    initial: float = 0.0  # every element of a new sequence's state
    batch_axis: int = Field(0, ge=0)  # where streams stack in one forward pass (silero-vad's state: 1)


class ControlSpec(_Strict):
    """Triton's sequence control inputs (its ``control_input``), filled by the server per request."""

    input: str
    kind: Literal["start", "end", "ready", "corrid"]  # 1 on a sequence's first / last request; 1; its id


class SpeechEvents(_Strict):
    """Speech start/end events from a voice activity model's probabilities, per sequence (streaming/vad.py's
    SpeechDetector, silero's rules and defaults): answered as the BYTES output ``name``, one JSON per event."""

    kind: Literal["speech"]
    output: str = "output"  # the model output with one speech probability per step
    name: str = "events"  # the answered BYTES output: '{"event": "start", "time": 1.02}' per event
    window: int = Field(512, ge=1)  # samples a step: an event's time counts steps of this many samples
    rate: int = Field(16000, ge=1)
    threshold: float = Field(0.5, gt=0, lt=1)
    min_silence_ms: float = Field(100, ge=0)
    min_speech_ms: float = Field(250, ge=0)
    speech_pad_ms: float = Field(30, ge=0)


class SequenceConfig(_Strict):
    """A stateful model: the engine keeps each sequence's state and feeds it back step by step.

    Requests name their sequence (V2 parameters ``sequence_id``, ``sequence_start``, ``sequence_end``, as
    Triton's sequence batcher; a WebSocket stream is one sequence); steps of different sequences run
    batched, their states stacked along ``batch_axis``.
    """

    state: list[StateSpec] = Field(default_factory=list)
    control: list[ControlSpec] = Field(default_factory=list)
    constants: dict[str, float] = Field(default_factory=dict)  # inputs fed the same value every step (sr: 16000)
    max_sequences: int = Field(1024, ge=1)  # live states; one more is refused (503) until one ends or idles out
    idle_timeout_s: float = Field(60.0, gt=0)  # a state unused this long is freed
    events: SpeechEvents | None = None  # events detected over each sequence's outputs, answered step by step


class GenerationConfig(_Strict):
    """Language models: the decoder's shape, context, special tokens, chat template (written by the importer)."""

    context_length: int = Field(2048, ge=1)
    bos_token_id: int = -1
    add_bos_token: bool = False
    stop_token_ids: list[int] = []
    chat_template: str | None = None  # a file beside model.yaml
    max_tokens: int = Field(256, ge=1)  # default completion length
    n_layer: int = Field(ge=1)
    n_head_kv: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    n_vocab: int = Field(ge=1)
    # serving (continuous batching, generation/scheduler.py)
    slots: int = Field(8, ge=1, le=64)  # sequences decoded together in one ONNX Runtime call
    queue: int = Field(64, ge=0)  # requests waiting for a slot; one more gets 503
    prefill_chunk: int = Field(64, ge=1)  # prompt tokens per call, between decode steps of running streams
    prefix_cache_mib: int = Field(128, ge=0)  # KV of prompt prefixes kept for reuse; 0 turns it off




class ModelConfig(_Strict):
    """Everything model.yaml can say about a model."""

    model_config = ConfigDict(defer_build=True)  # pre: needs the kinds' registry, which imports this module

    task: str  # a name in forwardpass/tasks.py's TASKS
    description: str = ""
    inputs: list[TensorSpec] | None = None  # None: taken from the ONNX file
    outputs: list[TensorSpec] | None = None
    labels: list[str] | str | None = None  # a list, or a file name (one label a line)
    pre: PreConfig = Field(default={"kind": "tensor"}, validate_default=True)  # no pre-processing
    post: PostConfig | None = None  # None: from the task
    batching: Batching = Batching()
    instances: int = Field(1, ge=1)
    cache: Cache = Cache()
    drift: Drift = Drift()
    prediction_log: PredictionLog = PredictionLog()
    scale: Scale = Scale()  # replicas on Ray Serve
    threads: Threads = Threads()
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    version_policy: VersionPolicy = LatestPolicy(latest=1)
    metrics: dict[str, float] = {}  # held-out evaluation recorded when the model was built
    generation: GenerationConfig | None = None  # task: generation
    sequence: SequenceConfig | None = None  # a stateful model (engine/sequences.py)
    runtime: RuntimeConfig = RuntimeConfig()  # what runs the forward pass (runtime/__init__.py)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise PydanticCustomError("literal_error", "Input should be one of {expected}",
                                      {"expected": ", ".join(repr(t) for t in TASKS)})  # fmt: skip
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_post(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("post") is None:
            known = TASKS.get(str(data.get("task")))
            kind = known.default_post if known is not None else "passthrough"
            data = {**data, "post": {"kind": kind}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        self.pre.check_inputs(self.inputs)  # the kind's own checks (pre.input, tabular features, ...)
        if TASKS[self.task].generative and self.generation is None:
            raise ValueError("task: generation needs a 'generation' section (forwardpass import gguf writes it)")
        return self


# --- loading with errors that say file, field and fix ------------------------------


def yaml_problem(exc: Exception) -> tuple[str, str]:
    """(where: 'line L, column C' or '', what) of a YAML file that does not parse."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return where, str(getattr(exc, "problem", None) or exc)


def load_config(path: Path) -> ModelConfig:
    """Read and validate a model.yaml; any mistake raises ModelConfigError (file, field, fix)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelConfigError(str(path), "", "file not found", "create it (see README: model.yaml)") from None
    except yaml.YAMLError as exc:
        where, problem = yaml_problem(exc)
        raise ModelConfigError(str(path), where, f"not valid YAML: {problem}", "fix the YAML syntax there") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(
            str(path), "", f"expected a mapping of fields, got {type(raw).__name__}", "start with 'task: ...'"
        )
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(path, exc) from None


def _config_error(path: Path, exc: ValidationError, known: list[str] | None = None) -> ModelConfigError:
    """The first useful complaint of a validation; ``known``: the fields a misspelt top-level name may mean."""
    # the most specific error first: a deep loc, and a real complaint over "missing"/"extra" from union arms
    errors = exc.errors()
    err = max(errors, key=lambda e: len(e["loc"]) + (e["type"] not in ("missing", "extra_forbidden", "literal_error")))
    # drop the union tags pydantic adds ('tabular', 'LatestPolicy', ...) so loc reads like the YAML
    loc = ".".join(str(p) for p in _yaml_loc(err["loc"]))
    kind = err["type"]
    msg = err["msg"]
    if kind == "missing":
        fix = f"add '{loc.rsplit('.', 1)[-1]}' to model.yaml"
    elif kind == "extra_forbidden":
        fix = f"remove '{loc.rsplit('.', 1)[-1]}' or correct its spelling" + _suggest(loc, known)
    elif kind in ("literal_error", "union_tag_invalid", "enum"):
        fix = "use one of the values listed"
    else:
        fix = "correct the value"
    got = err.get("input")
    got_text = "" if kind == "missing" or isinstance(got, (dict, list)) else f", got {got!r}"
    return ModelConfigError(str(path), loc, f"{msg.removeprefix('Value error, ')}{got_text}", fix)


_UNION_TAGS = {"classification", "regression", "passthrough", "embedding", "function-after",
               "function-before"}  # and pre kinds


def _yaml_loc(loc: tuple[Any, ...]) -> list[Any]:
    """Drop the union tags pydantic puts in loc ('tabular', 'LatestPolicy', ...) so it reads like the YAML."""
    from forwardpass.pipeline import kinds  # a pre-processing kind's name is its tag

    tags = _UNION_TAGS.union(kinds.names())
    out: list[Any] = []
    for part in loc:
        is_tag = isinstance(part, str) and (part[:1].isupper() or "[" in part or part in tags)
        if not is_tag:
            out.append(part)
    return out


def _suggest(loc: str, known: list[str] | None) -> str:
    name = loc.rsplit(".", 1)[-1]
    fields = (list(ModelConfig.model_fields) if known is None else known) if "." not in loc else []
    close = difflib.get_close_matches(name, fields, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
