"""One home per rule: a request is resolved once (threshold, output tokens, prompt text and tokens, the key's
backends), routing raises domain errors, and one place maps them to HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from starlette.datastructures import Headers

from router import errors
from router.affinity import Session, Verdict
from router.config import AffinityConfig, PolicyConfig, ScorerConfig
from router.http import error_response, status_of
from router.metrics import Metrics
from router.policy import Reason
from router.probe import ProbeSet, load_probe
from router.protocols import ChatProtocol, ResponsesProtocol
from router.request import Resolver, estimate_tokens
from router.responses import ResponsesRequest, prepare
from router.routing import ProbeGroup, Routed, Router
from router.schemas import ChatCompletionRequest, CompletionRequest
from router.scorer.interface import Scored
from router.scorer.recipe import ScorerInfo
from router.session_state import LocalAffinity
from router.text_features import prompt_text
from router.upstream import Relay
from tests.support.fakes import ViewEncoder
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
    encoder = ViewEncoder()

    async def score(self, messages: object, timeout_s: float | None = None, **_: object) -> Scored:
        return Scored(np.zeros(4, dtype=np.float32), prompt_tokens=3, queue_s=0.0, total_s=0.001)


def _router(tmp_path: Path, affinity: LocalAffinity | None = None) -> Router:
    settings = make_settings(tmp_path, ScorerConfig(model=str(tmp_path)), INFO, "http://127.0.0.1:9",
                             "http://127.0.0.1:9")
    probes = ProbeSet([b.name for b in settings.backends], [load_probe(b.probe) for b in settings.backends])
    return Router(settings, [ProbeGroup(_Scorer(), probes)], Metrics(), affinity=affinity)  # type: ignore[list-item]


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
    with pytest.raises(errors.PermissionDenied):
        _ask(router, "large", frozenset({"small"}))
    with pytest.raises(errors.PermissionDenied):
        _ask(router, "router", frozenset({"unprobed"}))
    with pytest.raises(errors.NotFound):
        _ask(router, "no-such-model", None)


def test_the_resolver_settles_a_responses_request_on_its_whole_conversation() -> None:
    resolver = Resolver(PolicyConfig(threshold=0.7, expected_output_tokens=300))
    body = {"model": "router", "input": "And times 3?", "instructions": "Be brief.", "max_output_tokens": 40,
            "stream": True, "previous_response_id": "resp_1"}
    req = ResponsesRequest.model_validate(body)
    stored = [{"type": "message", "role": "user", "content": "What is 2+2?"},
              {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "4"}]}]
    call = resolver.responses(prepare(body, req, stored), req, threshold=None, client="k", backends=None)
    r = call.request
    assert (call.path, call.stream, r.output_tokens, r.threshold, r.routed) == ("responses", True, 40, 0.7, True)
    assert isinstance(call.protocol, ResponsesProtocol) and call.conversation is not None
    assert [m["role"] for m in r.messages] == ["system", "user", "assistant", "user"]
    assert r.prompt_tokens == estimate_tokens(prompt_text(r.messages))
    assert call.body["input"][-1]["content"] == "And times 3?" and "previous_response_id" not in call.body
    assert isinstance(resolver.chat({"model": "m", "messages": [{"role": "user", "content": "q"}]},
                                    ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "q"}]),
                                    threshold=None, client="", backends=None).protocol, ChatProtocol)


def test_the_resolver_names_the_sessions_of_routed_requests_scoped_by_key() -> None:
    resolver = Resolver(PolicyConfig(), affinity=AffinityConfig())
    messages = [{"role": "user", "content": "q"}]

    def session(model: str = "router", client: str = "k", headers: dict[str, str] | None = None, **body: object):
        doc = {"model": model, "messages": messages, **body}
        return resolver.chat(doc, ChatCompletionRequest.model_validate(doc), threshold=None, client=client,
                             backends=None, headers=Headers(headers or {})).request.session

    named = session(headers={"X-Session-Id": "s1"})
    assert named is not None and named.source == "header" and named.lookup
    assert session(headers={"x-session-id": "s1"}, client="other").key != named.key  # another key's session
    assert session(prompt_cache_key="s1").source == "prompt_cache_key"
    first = session()
    assert first is not None and first.source == "opening" and not first.lookup  # a first turn only pins
    assert session(model="small", headers={"x-session-id": "s1"}) is None  # a named backend: no affinity
    assert Resolver(PolicyConfig(), affinity=AffinityConfig(enabled=False)).session(
        "router", Headers({"x-session-id": "s"}), {}, messages, "k") is None


def test_routing_keeps_a_session_on_its_pin_looked_up_while_scoring(tmp_path: Path) -> None:
    store = LocalAffinity(10, 60)
    router = _router(tmp_path, store)
    resolver = Resolver(router.policy, affinity=AffinityConfig())

    def route(threshold: float, available: set[str], messages: list | None = None) -> Routed:
        request = resolver.routable("router", [{"role": "user", "content": "q"}] if messages is None else messages,
                                    prompt_tokens=1, max_tokens=None, threshold=threshold, client="k",
                                    backends=None, session=Session("s", "header", True))
        return asyncio.run(router.route(request, available=available))

    fresh = route(0.5, {"small", "large"})
    assert (fresh.decision.backend, fresh.affinity.verdict, fresh.affinity.pin) == ("small", Verdict.NEW, True)
    asyncio.run(store.pin("s", "small"))
    kept = route(0.75, {"small", "large"})  # fresh: large; small's 0.70 is within the break margin of 0.75
    assert (kept.decision.backend, kept.decision.reason, kept.decision.order) == ("small", Reason.AFFINITY,
                                                                                  ("small", "large"))
    assert kept.probabilities["small"] == pytest.approx(0.70, abs=1e-3)
    assert route(0.9, {"small", "large"}).affinity.verdict is Verdict.ESTIMATE
    assert route(0.5, {"large"}).affinity.verdict is Verdict.UNAVAILABLE
    unscored = route(0.9, {"small", "large"}, messages=[])  # no estimate is no reason to move it
    assert (unscored.decision.backend, unscored.affinity.verdict) == ("small", Verdict.KEPT)
    assert _ask(router, "small", None).affinity is None  # a named backend: affinity does not apply


@pytest.mark.parametrize(("error", "status"), [
    (errors.InvalidRequest("m"), 400), (errors.AuthenticationFailed("m"), 401), (errors.PermissionDenied("m"), 403),
    (errors.NotFound("m"), 404), (errors.TooLarge("m"), 413), (errors.RateLimited("m", retry_after_s=1.2), 429),
    (errors.UpstreamFailed("m"), 502), (errors.Unavailable("m"), 503), (errors.HTTPRefusal(405, "m"), 405),
    (errors.RouterError("m"), 500),
])
def test_one_place_maps_each_domain_error_to_its_status_and_openai_body(error: errors.RouterError,
                                                                        status: int) -> None:
    assert status_of(error) == status
    response = error_response(error)
    assert response.status_code == status
    assert b'"error":{"message":"m"' in response.body
    if isinstance(error, errors.RateLimited):
        assert response.headers["retry-after"] == "2"


def test_a_rate_limit_that_waiting_cannot_lift_says_no_retry_after() -> None:
    assert "retry-after" not in error_response(errors.RateLimited("too big", retry_after_s=None)).headers


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
