"""Conversations through the gateway over real HTTP, in front of small OpenAI-compatible backends of our own:
POST /v1/responses (JSON and SSE, continued with previous_response_id by the gateway), session affinity (kept,
broken, moved by failover) and the decision-only POST /v1/route. The real stand-ins: tests/integration."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from tests.support.servers import FakeBackend, serve
from tests.support.stack import make_settings, metric, running_gateway
from tests.unit.test_conversation_view import conversation

QUESTION = "What is 2 + 2?"


@dataclass
class Stack:
    url: str
    small: FakeBackend
    large: FakeBackend
    client: openai.OpenAI

    def metric(self, name: str) -> float:
        return metric(self.url, name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_scorer_cfg: ScorerConfig,
          tiny_extractor: FeatureExtractor) -> Iterator[Stack]:
    small, large = FakeBackend("org/small", "small says 4"), FakeBackend("org/large", "large says 4")
    with serve(small.app) as small_url, serve(large.app) as large_url:
        settings = make_settings(tmp_path_factory.mktemp("probes"), tiny_scorer_cfg, tiny_extractor.info,
                                 small_url, large_url)
        with running_gateway(settings) as url:
            yield Stack(url, small, large, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))


@pytest.fixture(autouse=True)
def healthy_backends(stack: Stack) -> Iterator[None]:
    yield
    stack.small.status = stack.large.status = 200
    stack.small.break_stream_after = stack.large.break_stream_after = None


def test_a_response_is_routed_and_forwarded_self_contained(stack: Stack) -> None:
    raw = stack.client.responses.with_raw_response.create(model="router", input=QUESTION,
                                                          instructions="Be brief.", max_output_tokens=20)
    assert raw.headers["x-router-backend"] == "large"  # small's 0.70 < 0.8 ≤ large's 0.95
    assert raw.headers["x-router-reason"] == "threshold_met"
    assert float(raw.headers["x-router-p-success"]) == pytest.approx(0.95, abs=1e-4)
    assert raw.parse().output_text == "large says 4"
    sent = stack.large.received[-1]
    assert sent["model"] == "org/large" and sent["store"] is False and "previous_response_id" not in sent
    assert sent["input"] == [{"type": "message", "role": "user", "content": QUESTION}]
    assert sent["instructions"] == "Be brief." and sent["max_output_tokens"] == 20


def test_previous_response_id_is_expanded_by_the_gateway(stack: Stack) -> None:
    first = stack.client.responses.create(model="router", input=QUESTION)
    second = stack.client.responses.create(model="router", input="And times 3?", previous_response_id=first.id)
    sent = stack.large.received[-1]
    assert "previous_response_id" not in sent and sent["store"] is False
    assert [(i.get("role"), i.get("type")) for i in sent["input"]] == [
        ("user", "message"), ("assistant", "message"), ("user", "message")]
    assert sent["input"][1]["content"][0]["text"] == "large says 4"  # the first answer's output item
    third = stack.client.responses.create(model="router", input=[{"role": "user", "content": "Sure?"}],
                                          previous_response_id=second.id)
    assert len(stack.large.received[-1]["input"]) == 5 and third.output_text
    assert stack.metric('router_responses_conversations_total{outcome="expanded"}') >= 2


def test_an_unknown_or_unstored_previous_response_is_a_404(stack: Stack) -> None:
    before = len(stack.large.received)
    with pytest.raises(openai.NotFoundError) as err:
        stack.client.responses.create(model="router", input="Hi", previous_response_id="resp_nobody")
    assert err.value.code == "previous_response_not_found" and err.value.param == "previous_response_id"
    unstored = stack.client.responses.create(model="router", input=QUESTION, store=False)
    with pytest.raises(openai.NotFoundError):
        stack.client.responses.create(model="router", input="Hi", previous_response_id=unstored.id)
    assert len(stack.large.received) == before + 1  # nothing forwarded for the 404s


def test_a_streamed_response_counts_its_usage_and_can_be_continued(stack: Stack) -> None:
    tokens = stack.metric('router_completion_tokens_total{backend="large"}')
    with stack.client.responses.with_streaming_response.create(model="router", input=QUESTION,
                                                               stream=True) as raw:
        assert raw.headers["x-router-backend"] == "large"
        events = list(raw.parse())
    assert next(e.type for e in events) == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.strip() == "large says 4"
    assert stack.metric('router_completion_tokens_total{backend="large"}') == tokens + 7  # from response.completed
    rid = events[-1].response.id
    stack.client.responses.create(model="router", input="Again?", previous_response_id=rid)
    assert len(stack.large.received[-1]["input"]) == 3


def test_a_stream_broken_off_ends_with_a_responses_error_event(stack: Stack) -> None:
    stack.large.break_stream_after = 1
    events = list(stack.client.responses.create(model="large", input=QUESTION, stream=True))
    assert events[-1].type == "error" and events[-1].code == "stream_interrupted"
    assert all(e.type != "response.completed" for e in events)


def test_a_response_can_be_rated_by_its_id(stack: Stack) -> None:
    answer = stack.client.responses.create(model="router", input=QUESTION)
    rated = httpx.post(f"{stack.url}/v1/feedback", json={"id": answer.id, "correct": True})
    assert rated.status_code == 200 and rated.json()["backend"] == "large"


def test_responses_name_backends_and_refuse_what_cannot_be_served(stack: Stack) -> None:
    raw = stack.client.responses.with_raw_response.create(model="small", input=QUESTION)
    assert (raw.headers["x-router-backend"], raw.headers["x-router-reason"]) == ("small", "explicit_backend")
    for body, status, param in [
        ({"model": "router"}, 400, "input"),
        ({"model": "router", "input": "x", "background": True}, 400, "background"),
        ({"model": "router", "input": [1]}, 400, "input[0]"),
        ({"model": "router", "input": "x", "conversation": "conv_1"}, 400, "conversation"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": "router", "input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ]:
        response = httpx.post(f"{stack.url}/v1/responses", json=body)
        assert response.status_code == status, body
        assert response.json()["error"]["param"] == param


def test_a_session_stays_on_its_backend_until_its_estimate_breaks_the_pin(stack: Stack) -> None:
    session = {"x-session-id": "s-estimate"}

    def turn(threshold: str) -> tuple[str, str]:
        raw = stack.client.chat.completions.with_raw_response.create(
            model="router", messages=[{"role": "user", "content": QUESTION}],
            extra_headers={**session, "x-router-threshold": threshold})
        return raw.headers["x-router-backend"], raw.headers["x-router-reason"]

    kept = stack.metric('router_affinity_total{outcome="kept"}')
    assert turn("0.5") == ("small", "threshold_met")  # the first turn pins small
    assert turn("0.75") == ("small", "affinity")  # fresh: large; small's 0.70 is not below 0.75 - 0.1
    assert stack.metric('router_affinity_total{outcome="kept"}') == kept + 1
    assert turn("0.85") == ("large", "threshold_met")  # 0.70 < 0.85 - 0.1: broken on the estimate, large pinned
    assert turn("0.5") == ("large", "affinity")  # fresh: small; large keeps it
    assert stack.metric('router_affinity_total{outcome="estimate"}') >= 1


def test_a_conversation_is_its_own_session(stack: Stack) -> None:
    opening = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Pick a number."}]
    raw = stack.client.chat.completions.with_raw_response.create(
        model="router", messages=opening, extra_headers={"x-router-threshold": "0.5"})
    assert raw.headers["x-router-backend"] == "small"
    later = [*opening, {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another?"}]
    raw = stack.client.chat.completions.with_raw_response.create(model="router", messages=later,
                                                                 extra_headers={"x-router-threshold": "0.75"})
    assert (raw.headers["x-router-backend"], raw.headers["x-router-reason"]) == ("small", "affinity")
    other = [{"role": "user", "content": "Pick a colour."}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "Another?"}]  # another opening: another session, never pinned
    raw = stack.client.chat.completions.with_raw_response.create(model="router", messages=other,
                                                                 extra_headers={"x-router-threshold": "0.75"})
    assert (raw.headers["x-router-backend"], raw.headers["x-router-reason"]) == ("large", "threshold_met")


def test_a_failover_moves_the_pin_and_a_pinned_backend_that_is_down_breaks_it(
        tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    small, large = FakeBackend("org/small", "small"), FakeBackend("org/large", "large")
    with serve(small.app) as small_url, serve(large.app) as large_url:
        settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url,
                                 resilience={"failure_threshold": 1, "cooldown_s": 60,
                                             "health_interval_s": 3600})
        with running_gateway(settings) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

            def turn(session: str, threshold: str = "0.8") -> tuple[str, str]:
                raw = client.chat.completions.with_raw_response.create(
                    model="router", messages=[{"role": "user", "content": "q"}],
                    extra_headers={"x-session-id": session, "x-router-threshold": threshold})
                return raw.headers["x-router-backend"], raw.headers["x-router-reason"]

            assert turn("moved", "0.5") == ("small", "threshold_met")
            assert turn("down") == ("large", "threshold_met")
            small.status = 500  # its circuit opens at the first failure (failure_threshold 1)
            assert turn("moved", "0.5") == ("large", "failover")  # kept on small, which failed: large answered
            small.status = 200
            assert turn("moved", "0.5") == ("large", "affinity")  # pinned to the backend that answered
            client.chat.completions.create(model="small", messages=[{"role": "user", "content": "q"}])  # closes it
            large.status = 500
            with pytest.raises(openai.APIStatusError):  # named: its own error goes to the client; circuit opens
                client.chat.completions.create(model="large", messages=[{"role": "user", "content": "q"}])
            assert turn("down") == ("small", "best_estimate")  # large is down: the fresh decision, among the rest
            assert metric(url, 'router_affinity_total{outcome="unavailable"}') == 1


def test_affinity_off_routes_every_turn_afresh(tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
                                               tiny_extractor: FeatureExtractor) -> None:
    small, large = FakeBackend("org/small"), FakeBackend("org/large")
    with serve(small.app) as small_url, serve(large.app) as large_url:
        settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url,
                                 affinity={"enabled": False})
        with running_gateway(settings) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            routes = [client.chat.completions.with_raw_response.create(
                model="router", messages=[{"role": "user", "content": "q"}],
                extra_headers={"x-session-id": "s", "x-router-threshold": t}).headers["x-router-backend"]
                for t in ("0.5", "0.9")]
            assert routes == ["small", "large"]
            assert metric(url, "router_affinity_total") == 0


def test_route_gives_the_decision_without_forwarding(stack: Stack) -> None:
    received = len(stack.small.received) + len(stack.large.received)
    requests = stack.metric("router_requests_total")
    response = httpx.post(f"{stack.url}/v1/route", json={"model": "router", "messages": [
        {"role": "user", "content": QUESTION}]})
    assert response.status_code == 200
    decision = response.json()
    assert decision["backend"] == "large" and decision["model"] == "org/large"
    assert decision["reason"] == "threshold_met" and decision["threshold"] == 0.8
    assert decision["estimates"] == pytest.approx({"small": 0.70, "large": 0.95}, abs=1e-4)
    assert decision["order"] == ["large", "small"] and decision["scorer_ms"] > 0
    assert response.headers["x-router-backend"] == "large" and response.headers["x-router-request-id"] == decision["id"]
    assert len(stack.small.received) + len(stack.large.received) == received  # nothing forwarded
    assert stack.metric('router_route_only_total{backend="large",reason="threshold_met"}') >= 1
    assert stack.metric("router_requests_total") == requests
    rated = httpx.post(f"{stack.url}/v1/feedback", json={"id": decision["id"], "correct": False})
    assert rated.status_code == 200 and rated.json()["backend"] == "large"
    named = httpx.post(f"{stack.url}/v1/route", json={"model": "small", "messages": [
        {"role": "user", "content": QUESTION}]}).json()
    assert (named["backend"], named["reason"], named["estimates"]) == ("small", "explicit_backend", {})
    bad = httpx.post(f"{stack.url}/v1/route", json={"model": "router", "messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
input_text = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]), "text": text})
input_image = st.fixed_dictionaries({"type": st.just("input_image"), "detail": st.sampled_from(["auto", "low"]),
                                     "image_url": st.sampled_from(["data:image/png;base64,iVBORw0KGgo=",
                                                                   "https://example.com/a.png"])})
input_file = st.fixed_dictionaries({"type": st.just("input_file"), "file_data": st.just("JVBERi0="),
                                    "filename": st.just("a.pdf")})
item = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant"]),
                           "content": st.one_of(text, st.lists(st.one_of(input_text, input_image, input_file),
                                                               max_size=3))},
                          optional={"type": st.just("message")}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": st.text(min_size=1, max_size=8),
                           "name": st.text(min_size=1, max_size=8), "arguments": text}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": st.text(min_size=1, max_size=8),
                           "output": st.one_of(text, st.lists(st.one_of(input_text, input_image), max_size=2))}),
    st.fixed_dictionaries({"type": st.just("reasoning"), "id": st.just("rs_1"),
                           "summary": st.lists(st.fixed_dictionaries({"type": st.just("summary_text"),
                                                                      "text": text}), max_size=2)}),
    st.fixed_dictionaries({"type": st.just("item_reference"), "id": st.just("msg_1")}),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(messages=conversation)
def test_no_valid_chat_message_shape_gets_a_server_error(stack: Stack, messages: list[dict[str, Any]]) -> None:
    for path in ("chat/completions", "route"):
        response = httpx.post(f"{stack.url}/v1/{path}", json={"model": "router", "messages": messages},
                              timeout=30)
        assert response.status_code in (200, 403), response.text  # 403: an image by URL, refused by policy


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(items=st.lists(item, min_size=1, max_size=6), instructions=st.none() | text, stream=st.booleans())
def test_no_valid_responses_input_gets_a_server_error(stack: Stack, items: list[dict[str, Any]],
                                                     instructions: str | None, stream: bool) -> None:
    body = {"model": "router", "input": items, "instructions": instructions, "stream": stream}
    response = httpx.post(f"{stack.url}/v1/responses", json=body, timeout=30)
    remote = "https://" in orjson.dumps(items).decode()
    assert response.status_code == (403 if remote else 200), response.text  # media by URL: refused by policy
    if response.status_code == 200 and not stream:
        again = httpx.post(f"{stack.url}/v1/responses", json={
            "model": "router", "input": items, "previous_response_id": response.json()["id"]}, timeout=30)
        assert again.status_code == 200, again.text
