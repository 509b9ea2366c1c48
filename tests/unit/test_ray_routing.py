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
