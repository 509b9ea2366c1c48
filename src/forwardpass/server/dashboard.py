"""The web dashboard: a page at ``/`` (for a browser: JSON clients still get JSON there) and ``/ui/``, its
static files (shipped in the package, no build step, nothing fetched from elsewhere), and the one summary
of the repository the page starts from (``/ui/api/models``).

Everything else the page shows comes from the server's own API, with the caller's key when one is given:
``:predict`` to try a model, ``/v1/chat/completions`` streamed for a chat, ``/metrics`` polled for the
charts, ``/v1/usage`` for usage per key, ``/v2/models/{m}/drift``.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from forwardpass.engine import Engine
from forwardpass.errors import ForwardpassError, ModelNotFound
from forwardpass.server.http import Request, Response

ASSETS = {  # name -> content type: the only files /ui/ serves
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_CACHE: dict[str, bytes] = {}
# the page's own files and the server's API: nothing else may load (no CDN, no inline script)
_POLICY = (b"default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self'; "
           b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'")  # fmt: skip


def wants_page(request: Request) -> bool:
    """A browser navigating to a page; curl and API clients (*/*, JSON, or a list with text/html somewhere in
    it, as Java's default) get the JSON they always got."""
    if request.header(b"sec-fetch-dest") == "document":  # every current browser says so when it navigates
        return True
    accept = request.header(b"accept") or ""
    return accept.startswith("text/html") and "application/json" not in accept


def _read(name: str) -> bytes:
    if name not in _CACHE:
        _CACHE[name] = resources.files("forwardpass.server").joinpath("ui", name).read_bytes()
    return _CACHE[name]


class Dashboard:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def page(self, request: Request) -> Response:
        return Response(200, _read("index.html"), ASSETS["index.html"],
                        [(b"content-security-policy", _POLICY), (b"cache-control", b"no-cache"), (b"vary", b"accept"),
                         (b"x-content-type-options", b"nosniff")])  # fmt: skip

    async def asset(self, request: Request, name: str) -> Response:
        if name == "index.html":
            return await self.page(request)
        if name not in ASSETS:
            raise ModelNotFound(f"/ui/{name[:60]}: no such file; the dashboard is at /ui/")
        return Response(200, _read(name), ASSETS[name], [(b"cache-control", b"no-cache"),
                                                         (b"x-content-type-options", b"nosniff")])  # fmt: skip

    async def models(self, request: Request) -> Response:
        """Every model on disk with its state, and for served ones what the page needs to try it."""
        entries: dict[str, dict[str, Any]] = {}
        for entry in self.engine.index():
            found = entries.setdefault(entry["name"], {"name": entry["name"], "versions": []})
            found["versions"].append({k: entry[k] for k in ("version", "state", "reason") if k in entry})
        generators = self.engine.generators()
        for name, found in sorted(entries.items()):
            try:
                found.update(self._describe(name, generators))
            except ForwardpassError as exc:  # on disk, not served: its state and reason say why
                found.setdefault("kind", "unavailable")
                found["error"] = exc.message
        return Response.json({"models": [entries[n] for n in sorted(entries)]})

    def _describe(self, name: str, generators: dict[str, Any]) -> dict[str, Any]:
        if name in generators:
            llm = generators[name].model
            return {"kind": "generation", "task": "generation", "version": llm.version,
                    "description": llm.config.description, "context_length": llm.gen.context_length}  # fmt: skip
        served = self.engine.served(name)
        model, config = served.model, served.model.config
        inputs = model.inputs
        features = [f.name for f in (inputs[0].features or [])] if len(inputs) == 1 else []
        pre = model.pre_kind
        kind = pre if pre in ("tabular", "image", "text", "audio") else "tensor"
        if served.sequences is not None:
            kind = "stream"  # a stateful model: served by /v2/models/{m}/stream and forwardpass stream
        if kind == "tensor" and config.task == "embedding":
            kind = "embedding"
        image = None
        if pre == "image":
            image = {"color": getattr(config.pre, "color", "RGB"), "size": getattr(config.pre, "resize", None)}
        return {
            "kind": kind, "task": config.task, "version": model.version, "description": config.description,
            "features": features, "labels": model.labels or [], "metrics": config.metrics, "image": image,
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in inputs],
            "drift": served.drift.status if served.drift is not None else None,
        }  # fmt: skip
