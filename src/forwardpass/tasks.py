"""Tasks by name: model.yaml's ``task:`` picks one, and its traits say how the model is loaded and served.

    task("classification").default_post   # 'classification': the post-processing when model.yaml gives none
    task("generation").generative         # True: served by the continuous-batching scheduler (OpenAI API)
    task("embedding").loader              # an encoder whose pooled output is served by V2, :predict, /v1/embeddings
    task("custom").open(name, version, config, folder)   # a loaded Model

Nothing else tests a task by its name: the engine, batch and the CLI ask these traits. A new task is
one entry in TASKS (and, if it needs one, the class that loads it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forwardpass.config import ModelConfig


@dataclass(frozen=True)
class Task:
    """What a task means for loading and serving a model."""

    name: str
    default_post: str  # post-processing kind when model.yaml has no post:
    generative: bool = False  # a language model: tokens out, served by the scheduler, not V2 infer
    loader: str = "forwardpass.model:Model"  # "module:Class" of the loaded model, imported when first used

    def open(self, name: str, version: int, config: ModelConfig, folder: Path) -> Any:
        """One version of a model with this task, loaded."""
        module, _, attr = self.loader.partition(":")
        return getattr(importlib.import_module(module), attr)(name, version, config, folder)


TASKS: dict[str, Task] = {
    "classification": Task("classification", default_post="classification"),
    "regression": Task("regression", default_post="regression"),
    "custom": Task("custom", default_post="passthrough"),
    # an ONNX encoder whose output is pooled (mean, cls, last) into one vector per text (forwardpass/embedding.py)
    "embedding": Task("embedding", default_post="embedding", loader="forwardpass.embedding:EmbeddingModel"),
    # tokenizers and jinja2 are imported only for language models
    "generation": Task("generation", default_post="passthrough", generative=True,
                       loader="forwardpass.generation.model:LanguageModel"),  # fmt: skip
}


def task(name: str) -> Task:
    """The task model.yaml names (config validation has refused unknown names already)."""
    return TASKS[name]


def generative(config: ModelConfig) -> bool:
    """Whether a model is a language model, served by the OpenAI-compatible API."""
    return TASKS[config.task].generative
