"""``pre: {kind: tensor}`` (the default): no pre-processing, requests carry the model's input tensors.

    model.predict(np.zeros((8, 4), np.float32))    # tensors go straight to the model (Model.predict)
    model.predict([{"a": 1}])                      # InvalidInput: this model declares no pre-processing
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from forwardpass.config import PreOptions
from forwardpass.errors import InvalidInput
from forwardpass.pipeline.pre import Plan, Preprocessor


class TensorPre(PreOptions):
    """No pre-processing: requests carry the model's input tensors."""

    kind: Literal["tensor"] = "tensor"


class NoPre(Preprocessor):
    """Models without declared pre-processing take tensors only (see Model.predict)."""

    schema = TensorPre

    def is_single(self, data: Any) -> bool:
        return False

    def plan(self, instances: Sequence[Any]) -> Plan:
        raise InvalidInput(
            ("instances",), "this model declares no pre-processing: send input tensors (a numpy array or a "
            "mapping of input name to array)", instances[0] if instances else None,
        )  # fmt: skip
