"""The whole route table on one screen. Hot routes first: the router tries them in order."""

from __future__ import annotations

from forwardpass.server.handlers import Handlers
from forwardpass.server.http import Router
from forwardpass.server.openai import OpenAIHandlers


def routes(h: Handlers, o: OpenAIHandlers) -> Router:
    """Every endpoint the server answers."""
    return Router([
        ("POST", "/v2/models/{model}/infer", h.infer),
        ("POST", "/v2/models/{model}/versions/{version}/infer", h.infer),
        ("POST", "/v1/models/{model}:predict", h.predict),
        ("POST", "/v1/models/{model}/versions/{version}:predict", h.predict),
        ("POST", "/v1/chat/completions", o.chat_completions),
        ("POST", "/v1/completions", o.completions),
        ("GET", "/v1/models", o.models),
        ("GET", "/v2/health/ready", h.ready),
        ("GET", "/v2/health/live", h.live),
        ("GET", "/v2", h.server_metadata),
        ("GET", "/v2/models/stats", h.model_stats),
        ("GET", "/v2/models/{model}", h.model_metadata),
        ("GET", "/v2/models/{model}/versions/{version}", h.model_metadata),
        ("GET", "/v2/models/{model}/ready", h.model_ready),
        ("GET", "/v2/models/{model}/versions/{version}/ready", h.model_ready),
        ("GET", "/v2/models/{model}/config", h.model_config),
        ("GET", "/v2/models/{model}/versions/{version}/config", h.model_config),
        ("GET", "/v2/models/{model}/stats", h.model_stats),
        ("GET", "/v2/models/{model}/versions/{version}/stats", h.model_stats),
        ("POST", "/v2/repository/index", h.repository_index),
        ("POST", "/v2/repository/models/{model}/load", h.repository_load),
        ("POST", "/v2/repository/models/{model}/unload", h.repository_unload),
        ("GET", "/metrics", h.metrics),
        ("GET", "/", h.home),
    ])  # fmt: skip
