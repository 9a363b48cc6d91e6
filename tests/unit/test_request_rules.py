"""One home per rule: a request is resolved once (threshold, output tokens, prompt text and tokens, the key's
backends), routing raises domain errors, and one place maps them to HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from router.config import PolicyConfig, ScorerConfig
from router.errors import (
    AuthenticationFailed,
    HTTPRefusal,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    RouterError,
    TooLarge,
    Unavailable,
    UpstreamFailed,
)
from router.http import error_response, status_of
from router.metrics import Metrics
from router.probe import ProbeSet, load_probe
from router.request import Resolver, estimate_tokens
from router.routing import ProbeGroup, Router
from router.schemas import ChatCompletionRequest, CompletionRequest
from router.scorer.interface import Scored
from router.scorer.recipe import ScorerInfo
from router.upstream import Relay
from tests.support.stack import make_settings

INFO = ScorerInfo(model="m", layers=(2,), pooling="last", final_norm=True, hidden_size=4, feature_dim=4,
                  fingerprint="f")


def test_the_resolver_settles_threshold_output_tokens_prompt_and_key_once() -> None:
    policy = PolicyConfig(threshold=0.7, expected_output_tokens=300)
    resolver = Resolver(policy)
    body = {"model": "router", "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 40}]}]}
    call = resolver.chat(body, ChatCompletionRequest.model_validate(body), threshold=None, client="k",
                         backends=frozenset({"a"}))
    r = call.request
    assert (r.threshold, r.threshold_sent, r.output_tokens, r.routed) == (0.7, False, 300, True)
    assert r.prompt_tokens == 10  # content parts read as text (one function), 40 characters / 4
    assert r.allows("a") and not r.allows("b")
    body = dict(body, max_completion_tokens=50, model="b")
    r = resolver.chat(body, ChatCompletionRequest.model_validate(body), threshold=0.2, client="k",
                      backends=None).request
    assert (r.threshold, r.threshold_sent, r.output_tokens, r.routed) == (0.2, True, 50, False)
    assert r.allows("anything")


def test_a_threshold_source_replaces_the_configured_threshold_for_requests_that_set_none() -> None:
    resolver = Resolver(PolicyConfig(threshold=0.7), threshold=lambda: 0.42)
    assert resolver.routable("router", [], prompt_tokens=0, max_tokens=None, threshold=None, client="",
                             backends=None).threshold == 0.42


def test_completions_read_text_prompts_and_count_token_id_prompts() -> None:
    resolver = Resolver(PolicyConfig())
    text = resolver.completion({"prompt": ["ab", "cd"]}, CompletionRequest(model="router", prompt=["ab", "cd"]),
                               threshold=None, client="", backends=None).request
    assert text.messages == ({"role": "user", "content": "ab\ncd"},) and text.prompt_tokens == estimate_tokens("ab\ncd")
    ids = resolver.completion({}, CompletionRequest(model="router", prompt=[[1, 2, 3], [4, 5]]), threshold=None,
                              client="", backends=None).request
    assert ids.messages == () and not ids.scorable and ids.prompt_tokens == 5


class _Scorer:
    info = INFO
    encoder = None

    async def score(self, messages: object, timeout_s: float | None = None) -> Scored:
        return Scored(np.zeros(4, dtype=np.float32), prompt_tokens=3, queue_s=0.0, total_s=0.001)


def _router(tmp_path: Path) -> Router:
    settings = make_settings(tmp_path, ScorerConfig(model=str(tmp_path)), INFO, "http://127.0.0.1:9",
                             "http://127.0.0.1:9")
    probes = ProbeSet([b.name for b in settings.backends], [load_probe(b.probe) for b in settings.backends])
    return Router(settings, [ProbeGroup(_Scorer(), probes)], Metrics())  # type: ignore[list-item]


def _ask(router: Router, model: str, backends: frozenset[str] | None, threshold: float | None = None):
    request = Resolver(router.policy).routable(model, [{"role": "user", "content": "q"}], prompt_tokens=1,
                                               max_tokens=None, threshold=threshold, client="k", backends=backends)
    return asyncio.run(router.route(request, available={"small", "large"}))


def test_routing_keeps_to_the_keys_backends_and_raises_domain_errors(tmp_path: Path) -> None:
    router = _router(tmp_path)
    assert _ask(router, "router", None).decision.backend == "large"  # small 0.70 < 0.8
    only_small = _ask(router, "router", frozenset({"small"}))
    assert only_small.decision.order == ("small",) and set(only_small.probabilities) == {"small"}
    assert _ask(router, "router", None, threshold=0.5).decision.backend == "small"
    with pytest.raises(PermissionDenied):
        _ask(router, "large", frozenset({"small"}))
    with pytest.raises(PermissionDenied):
        _ask(router, "router", frozenset({"unprobed"}))
    with pytest.raises(NotFound):
        _ask(router, "no-such-model", None)


@pytest.mark.parametrize(("error", "status"), [
    (InvalidRequest("m"), 400), (AuthenticationFailed("m"), 401), (PermissionDenied("m"), 403),
    (NotFound("m"), 404), (TooLarge("m"), 413), (RateLimited("m", retry_after_s=1.2), 429),
    (UpstreamFailed("m"), 502), (Unavailable("m"), 503), (HTTPRefusal(405, "m"), 405), (RouterError("m"), 500),
])
def test_one_place_maps_each_domain_error_to_its_status_and_openai_body(error: RouterError, status: int) -> None:
    assert status_of(error) == status
    response = error_response(error)
    assert response.status_code == status
    assert b'"error":{"message":"m"' in response.body
    if isinstance(error, RateLimited):
        assert response.headers["retry-after"] == "2"


def test_a_rate_limit_that_waiting_cannot_lift_says_no_retry_after() -> None:
    assert "retry-after" not in error_response(RateLimited("too big", retry_after_s=None)).headers


async def test_a_relay_closed_before_its_first_chunk_still_closes_upstream_and_reports() -> None:
    events: list[str] = []

    async def chunks():  # an async generator that is never started runs no finally: the Relay covers it
        try:
            yield b"data: x\n\n"
        finally:
            events.append("generator closed")

    async def abandon() -> None:
        events.append("abandoned")

    await Relay(chunks(), abandon).aclose()
    assert events == ["abandoned"]
    relay = Relay(chunks(), abandon)
    assert await relay.__anext__() == b"data: x\n\n"
    await relay.aclose()
    await relay.aclose()  # once only
    assert events == ["abandoned", "generator closed"]
