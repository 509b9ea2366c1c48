"""How the Ray Serve ingress finds a request's model (server/ray_serve.py): no Ray needed."""

from __future__ import annotations

import pytest

from forwardpass.server.ray_serve import model_of


@pytest.mark.parametrize(("path", "body", "found"), [
    ("/v2/models/iris/infer", b"", ("iris", False)),
    ("/v2/models/iris/versions/2/infer", b"", ("iris", False)),
    ("/v1/models/iris:predict", b"", ("iris", False)),
    ("/v1/models/iris/versions/2:predict", b"", ("iris", False)),
    ("/v1/chat/completions", b'{"model": "smollm2", "stream": true}', ("smollm2", True)),
    ("/v1/completions", b'{"model": "smollm2"}', ("smollm2", False)),
    ("/v1/embeddings", b'{"model": "smollm2-embed", "input": "x"}', ("smollm2-embed", False)),
    ("/v1/chat/completions", b"{not json", (None, False)),  # the ingress's own app answers: a 400 naming the body
    ("/v1/chat/completions", b'{"model": 3}', (None, False)),
    ("/v2/models/stats", b"", (None, False)),  # every model's statistics
    ("/", b"", (None, False)),
    ("/ui/app.js", b"", (None, False)),
    ("/v2/health/ready", b"", (None, False)),
])  # fmt: skip
def test_the_model_comes_from_the_path_or_the_body(path, body, found):
    assert model_of(path, body) == found


def test_metrics_of_several_replicas_merge_into_one_exposition():
    from prometheus_client.parser import text_string_to_metric_families

    from forwardpass.server.ray_serve import merge_metrics

    def exposition(model: str, requests: float, inflight: float) -> bytes:
        return (f'# HELP forwardpass_requests_total Inference requests\n# TYPE forwardpass_requests_total counter\n'
                f'forwardpass_requests_total{{model="{model}",status="200"}} {requests}\n'
                f'# HELP forwardpass_inflight_requests In flight\n# TYPE forwardpass_inflight_requests gauge\n'
                f'forwardpass_inflight_requests {inflight}\n').encode()  # fmt: skip

    merged = merge_metrics([exposition("iris", 3, 1), exposition("digits", 5, 2)])
    samples = {(s.name, s.labels.get("model")): s.value for f in text_string_to_metric_families(merged.decode())
               for s in f.samples}  # fmt: skip
    assert samples[("forwardpass_requests_total", "iris")] == 3 and samples[("forwardpass_requests_total", "digits")] == 5
    assert samples[("forwardpass_inflight_requests", None)] == 3  # a process-wide gauge: summed
    types = [line for line in merged.splitlines() if line.startswith(b"# TYPE")]
    assert len(types) == len(set(types)) == 2  # one family each, whatever the number of replicas
