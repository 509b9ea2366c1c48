"""The whole route table on one screen: who may call each route (server/auth.py) and the shape its errors take.

Hot routes first: the router tries them in order.
"""

from __future__ import annotations

from forwardpass.server.auth import Access, Handler, Keys
from forwardpass.server.dashboard import Dashboard, wants_page
from forwardpass.server.errors import error_response, openai_error
from forwardpass.server.handlers import Handlers
from forwardpass.server.http import Request, Response, Router
from forwardpass.server.openai import OpenAIHandlers
from forwardpass.server.openai_extras import OpenAIExtras
from forwardpass.server.responses import ResponsesHandlers

PUBLIC, METRICS, INFER, ADMIN = Access.PUBLIC, Access.METRICS, Access.INFER, Access.ADMIN
Route = tuple[str, str, Handler, Access]  # method, path pattern, handler, who may call it


def routes(h: Handlers, o: OpenAIHandlers, x: OpenAIExtras, r: ResponsesHandlers, keys: Keys,
           usage: Handler) -> Router:  # fmt: skip
    """Every endpoint the server answers, behind its access check."""
    d = Dashboard(h.engine)
    home = keys.guard(h.home, INFER)

    async def root(request: Request) -> Response:  # a browser gets the dashboard, an API client the JSON
        if wants_page(request):
            return await d.page(request)
        response: Response = await home(request)
        response.headers.append((b"vary", b"accept"))
        return response

    v2: list[Route] = [
        ("POST", "/v2/models/{model}/infer", h.infer, INFER),
        ("POST", "/v2/models/{model}/versions/{version}/infer", h.infer, INFER),
        ("POST", "/v1/models/{model}:predict", h.predict, INFER),
        ("POST", "/v1/models/{model}/versions/{version}:predict", h.predict, INFER),
    ]
    openai: list[Route] = [  # refusals in OpenAI's error shape
        ("POST", "/v1/chat/completions", o.chat_completions, INFER),
        ("POST", "/v1/completions", o.completions, INFER),
        ("GET", "/v1/models", o.models, INFER),
        ("POST", "/v1/embeddings", x.embeddings, INFER),
        ("POST", "/v1/responses", r.create, INFER),
        ("GET", "/v1/responses/{response_id}", r.retrieve, INFER),
        ("GET", "/v1/models/{model}", x.model, INFER),
        ("POST", "/tokenize", x.tokenize, INFER),  # llama-server's
        ("POST", "/detokenize", x.detokenize, INFER),
        ("GET", "/v1/usage", usage, INFER),  # a key's own usage; every key's for an admin key (server/tenancy.py)
    ]
    rest: list[Route] = [
        ("GET", "/v2/health/ready", h.ready, PUBLIC),
        ("GET", "/v2/health/live", h.live, PUBLIC),
        ("GET", "/health", x.health, PUBLIC),  # llama-server's: {"status": "ok"}, 503 while loading
        ("GET", "/v2", h.server_metadata, INFER),
        ("GET", "/v2/models/stats", h.model_stats, INFER),
        ("GET", "/v2/models/{model}", h.model_metadata, INFER),
        ("GET", "/v2/models/{model}/versions/{version}", h.model_metadata, INFER),
        ("GET", "/v2/models/{model}/ready", h.model_ready, INFER),
        ("GET", "/v2/models/{model}/versions/{version}/ready", h.model_ready, INFER),
        ("GET", "/v2/models/{model}/config", h.model_config, INFER),
        ("GET", "/v2/models/{model}/versions/{version}/config", h.model_config, INFER),
        ("GET", "/v2/models/{model}/stats", h.model_stats, INFER),
        ("GET", "/v2/models/{model}/drift", h.drift, INFER),
        ("GET", "/v2/models/{model}/versions/{version}/drift", h.drift, INFER),
        ("POST", "/v2/models/{model}/feedback", h.feedback, INFER),  # true labels of logged requests
        ("GET", "/v2/models/{model}/quality", h.quality, INFER),  # accuracy over time, from the feedback
        ("GET", "/v2/models/{model}/versions/{version}/stats", h.model_stats, INFER),
        ("POST", "/v2/repository/index", h.repository_index, ADMIN),
        ("POST", "/v2/repository/models/{model}/load", h.repository_load, ADMIN),
        ("POST", "/v2/repository/models/{model}/unload", h.repository_unload, ADMIN),
        ("GET", "/metrics", h.metrics, METRICS),
        ("GET", "/", root, PUBLIC),  # the JSON part checks the key itself (home)
        ("GET", "/ui/api/models", d.models, INFER),  # the dashboard's start: every model, its state and inputs
        ("GET", "/ui/", d.page, PUBLIC),  # the page and its files: static, shipped in the package
        ("GET", "/ui/{name}", d.asset, PUBLIC),
    ]
    # each route with the wire shape of its errors (server/errors.py): OpenAI's for the OpenAI API, V2's elsewhere
    table = [(*route, error_response) for route in v2] + [(*route, openai_error) for route in openai] \
        + [(*route, error_response) for route in rest]  # fmt: skip
    metered = {h.infer, h.predict, o.chat_completions, o.completions, x.embeddings, r.create}  # usage per key
    # a path no route takes: under /v1/ (OpenAI's API, and KServe v1's :predict) OpenAI's error shape, V2's elsewhere
    return Router([(method, path, keys.guard(handler, access, handler in metered), errors)
                   for method, path, handler, access, errors in table], unmatched=[("/v1/", x.unknown_route)])  # fmt: skip
