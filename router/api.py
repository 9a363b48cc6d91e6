"""HTTP routes. Each handler only parses, hands the request to the gateway and returns its answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.errors import APIError
from router.gateway import THRESHOLD_HEADER, Forward, Gateway, parse_threshold
from router.schemas import ChatCompletionRequest, CompletionRequest, parse_body

routes = APIRouter()


def _body_schema(model: type) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def _read_body(request: Request) -> bytes:
    limit = request.app.state.settings.server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@routes.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    threshold = parse_threshold(request.headers.get(THRESHOLD_HEADER))
    body, req = parse_body(await _read_body(request), ChatCompletionRequest)
    fwd = Forward(
        path="chat/completions",
        body=body,
        model=req.model,
        messages=body["messages"],
        stream=req.stream,
        client_wants_usage=bool(req.stream_options and req.stream_options.include_usage),
        output_tokens=req.max_completion_tokens or req.max_tokens,
    )
    return await _gateway(request).handle(fwd, threshold)


def _prompt_text(prompt: str | list[Any]) -> str | None:
    """The text the scorer reads for /v1/completions; None for token-id prompts, which it cannot read."""
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return None


@routes.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
async def completions(request: Request) -> Response:
    threshold = parse_threshold(request.headers.get(THRESHOLD_HEADER))
    body, req = parse_body(await _read_body(request), CompletionRequest)
    text = _prompt_text(req.prompt)
    fwd = Forward(
        path="completions",
        body=body,
        model=req.model,
        messages=[{"role": "user", "content": text}] if text is not None else [],
        stream=req.stream,
        client_wants_usage=bool(req.stream_options and req.stream_options.include_usage),
        output_tokens=req.max_tokens,
    )
    return await _gateway(request).handle(fwd, threshold)


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
    state = request.app.state
    scorer_ok = state.batcher.alive
    backends = await state.pool.reachable()
    ok = scorer_ok and any(backends.values())
    body = {"ready": ok, "scorer": "loaded" if scorer_ok else "down",
            "backends": {n: "reachable" if up else "unreachable" for n, up in backends.items()}}
    return JSONResponse(body, status_code=200 if ok else 503)


@routes.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
