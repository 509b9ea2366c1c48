"""Pre-processing (instances -> tensors) and post-processing (tensors -> answers).

Pre-processing kinds are registered by name in ``pipeline.kinds`` (one module each); ``pipeline.pre``
is their contract (Preprocessor and its traits, Plan).
"""

from forwardpass.pipeline.answers import Answers, ClassificationAnswers, RegressionAnswers
from forwardpass.pipeline.kinds import build_pre
from forwardpass.pipeline.post import Postprocessor, build_post, softmax
from forwardpass.pipeline.pre import TABLE, BatchDefaults, Columns, Plan, Preprocessor

__all__ = ["Answers", "ClassificationAnswers", "RegressionAnswers", "Plan", "Preprocessor", "Postprocessor",
           "BatchDefaults", "Columns", "TABLE", "build_pre", "build_post", "softmax"]
