"""The plain baseline bench/serve.py compares against: FastAPI + uvicorn, a sync handler, one
ONNX Runtime session, one session.run per request (what a first server usually looks like).

    python bench/baseline_fastapi.py MODEL.onnx PORT
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from pydantic import BaseModel

DTYPES = {"FP32": np.float32, "INT64": np.int64}


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferBody(BaseModel):
    inputs: list[Tensor]


def build(model_path: str) -> FastAPI:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, body: InferBody):
        feeds = {t.name: np.asarray(t.data, DTYPES[t.datatype]).reshape(t.shape) for t in body.inputs}
        results = session.run(outputs, feeds)
        return {"model_name": name, "outputs": [
            {"name": n, "datatype": "FP32", "shape": list(r.shape), "data": r.reshape(-1).tolist()}
            for n, r in zip(outputs, results)]}

    @app.post("/binary/{name}/infer")
    async def infer_binary(name: str, request: Request):  # the CNN: V2 binary body, one run per request
        body = await request.body()
        n = int(request.headers["inference-header-content-length"])
        import json

        head = json.loads(body[:n])
        spec = head["inputs"][0]
        x = np.frombuffer(body[n:], np.float32).reshape(spec["shape"])
        result = session.run(outputs[:1], {spec["name"]: x})[0]
        return {"model_name": name, "outputs": [{"name": outputs[0], "shape": list(result.shape), "data": result.reshape(-1).tolist()}]}

    @app.get("/ready")
    def ready():
        return {"ready": True}

    return app


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
