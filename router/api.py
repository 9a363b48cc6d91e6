"""HTTP routes. Each handler only parses, hands the request to the gateway and returns its answer."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from router.auth import CLIENT_SCOPE_KEY, Client
from router.errors import InvalidRequest, TooLarge
from router.gateway import Gateway
from router.http import to_response, unless_client_leaves
from router.request import CompletionCall, Resolver
from router.responses import ResponsesRequest
from router.schemas import ChatCompletionRequest, CompletionRequest, FeedbackRequest, parse_body

THRESHOLD_HEADER = "x-router-threshold"

routes = APIRouter()  # keys, when configured, are checked by auth.APIKeyMiddleware for all but /health


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace pydantic's local ``#/$defs/X`` references (not valid inside an OpenAPI operation) by X itself."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The request body's schema for the OpenAPI document (the handler parses the body itself, see schemas)."""
    schema = model.model_json_schema()
    schema = _inline(schema, schema.get("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _threshold(request: Request) -> float | None:
    """The threshold for this request only, from its x-router-threshold header (None: the configured one)."""
    value = request.headers.get(THRESHOLD_HEADER)
    if value is None:
        return None
    try:
        t = float(value)
    except ValueError:
        t = float("nan")
    if not 0.0 <= t <= 1.0:
        raise InvalidRequest(f"header {THRESHOLD_HEADER} must be a number between 0 and 1, got {value!r}",
                             param=THRESHOLD_HEADER, code="invalid_header")
    return t


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def _read_body(request: Request) -> bytes:
    limit = request.app.state.settings.server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body is larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    while True:  # ASGI's receive() directly: Request.stream()'s async generator costs more than the read
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _client(request: Request) -> Client:
    """The key that sent the request (see auth.APIKeyMiddleware); without keys, everyone is one client."""
    return request.scope.get(CLIENT_SCOPE_KEY) or request.app.state.auth.anonymous


async def _complete(request: Request, call: CompletionCall) -> Response:
    """Admit a resolved call under its key's policy, then route and forward it while its client listens."""
    grant = await _client(request).admit(call)
    request_id = secrets.token_hex(16)  # as random as uuid4().hex, at a third of its cost
    send_timeout_s = request.app.state.settings.server.send_timeout_s

    async def answer() -> Response:
        return to_response(await _gateway(request).handle(call, request_id, grant), send_timeout_s)

    return await unless_client_leaves(request, answer())


def _resolver(request: Request) -> Resolver:
    return request.app.state.resolver


@routes.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    threshold = _threshold(request)
    body, req = parse_body(await _read_body(request), ChatCompletionRequest)
    client = _client(request)
    call = _resolver(request).chat(body, req, threshold=threshold, client=client.name, backends=client.backends,
                                   headers=request.headers)
    return await _complete(request, call)


@routes.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
async def completions(request: Request) -> Response:
    threshold = _threshold(request)
    body, req = parse_body(await _read_body(request), CompletionRequest)
    client = _client(request)
    call = _resolver(request).completion(body, req, threshold=threshold, client=client.name,
                                         backends=client.backends, headers=request.headers)
    return await _complete(request, call)


@routes.post("/v1/responses", openapi_extra=_body_schema(ResponsesRequest))
async def responses(request: Request) -> Response:
    """OpenAI's Responses API, routed like a chat; ``previous_response_id`` is continued by the gateway."""
    threshold = _threshold(request)
    body, req = parse_body(await _read_body(request), ResponsesRequest)
    req.check()
    client = _client(request)
    conversation = await _gateway(request).conversation(body, req, client.name)
    call = _resolver(request).responses(conversation, req, threshold=threshold, client=client.name,
                                        backends=client.backends, headers=request.headers)
    return await _complete(request, call)


@routes.post("/v1/route", openapi_extra=_body_schema(ChatCompletionRequest))
async def route(request: Request) -> Response:
    """The decision for a chat completion request (where it would go, each backend's estimate, why), without
    forwarding it: for clients that call their backends themselves."""
    threshold = _threshold(request)
    body, req = parse_body(await _read_body(request), ChatCompletionRequest)
    client = _client(request)
    call = _resolver(request).chat(body, req, threshold=threshold, client=client.name, backends=client.backends,
                                   headers=request.headers)
    await client.admit(call, decision_only=True)
    send_timeout_s = request.app.state.settings.server.send_timeout_s

    async def answer() -> Response:
        return to_response(await _gateway(request).decide(call, secrets.token_hex(16)), send_timeout_s)

    return await unless_client_leaves(request, answer())


HOT_ROUTES = {"/v1/chat/completions": chat_completions, "/v1/completions": completions, "/v1/responses": responses}
"""The routes that ``hot_routes.HotRoutes`` answers without FastAPI's routing (same handlers)."""


@routes.post("/v1/feedback", openapi_extra=_body_schema(FeedbackRequest))
async def feedback(request: Request) -> JSONResponse:
    """Rate an answer by its id (the x-router-request-id header or the completion's id)."""
    _, req = parse_body(await _read_body(request), FeedbackRequest)
    answered = await _gateway(request).rate(req.id, req.value(), _client(request).name)
    return JSONResponse({"id": req.id, "backend": answered.backend, "score": req.value(),
                         "p_success": answered.p_success})


@routes.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    created = request.app.state.started
    data = [{"id": settings.policy.alias, "object": "model", "created": created, "owned_by": "probe-router",
             "description": "routed by the probes to the cheapest backend likely to answer correctly"}]
    data += [{"id": b.name, "object": "model", "created": created, "owned_by": "probe-router",
              "served_model": b.model, "routed": b.probe is not None} for b in settings.backends]
    return JSONResponse({"object": "list", "data": data})


@routes.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@routes.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready when the scorer runs and a backend answers its health check now."""
    state = request.app.state
    scorers = await asyncio.gather(*(g.scorer.check() for g in state.probe_groups))
    scorer_ok = all(scorers)
    healthy = await state.pool.check_all()
    circuits = state.pool.states()
    ok = scorer_ok and any(healthy.values())
    body = {"ready": ok, "scorer": "up" if scorer_ok else "down",
            "backends": {n: {"healthy": healthy[n], "circuit": str(circuits[n])} for n in healthy}}
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
