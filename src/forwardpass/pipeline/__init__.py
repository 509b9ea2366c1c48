"""Pre-processing (instances -> tensors) and post-processing (tensors -> answers)."""

from forwardpass.pipeline.answers import Answers, ClassificationAnswers, RegressionAnswers
from forwardpass.pipeline.post import Postprocessor, build_post, softmax
from forwardpass.pipeline.pre import Plan, Preprocessor, build_pre

__all__ = ["Answers", "ClassificationAnswers", "RegressionAnswers", "Plan", "Preprocessor", "Postprocessor",
           "build_pre", "build_post", "softmax"]
