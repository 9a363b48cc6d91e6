"""Conversations end to end, as users call them with the openai SDK: two gateway replicas (the real default
scorer and the shipped probes) sharing a real redis-server, in front of the demo's real vLLM CPU stand-ins (tool
calling on). /v1/responses plain, streamed and continued with previous_response_id on the other replica; chat
with tools and a tool-result turn; a six-turn conversation kept on one backend by affinity across both replicas,
moved when its backend goes down, and its Responses conversation continued while that backend is down and after
it is back; the decision-only /v1/route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from router.app import create_app
from router.edge import server_options
from router.routing import load_probe_groups
from scripts.redis_server import redis_server
from tests.integration.conftest import Pool
from tests.support.servers import free_port, serve

pytestmark = pytest.mark.integration

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
            "clips did Natalia sell altogether in April and May?")
FOLLOW_UPS = ["How many did she sell in May alone?", "And if she sold twice as many in June as in May?",
              "What is the total for the three months?", "What is the average per month?",
              "Say the total again in words."]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
RESPONSES_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]


@dataclass
class Replicas:
    urls: tuple[str, str]
    clients: tuple[openai.OpenAI, openai.OpenAI]


@pytest.fixture(scope="module")
def replicas(vllm_pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    folder: Path = tmp_path_factory.mktemp("redis")
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(folder, free_port()))
        # break_margin 1: a pin breaks only when its backend is down or not allowed, never on a turn's estimate
        # (which depends on the shipped probes; tests/unit/test_affinity.py covers breaking on the estimate)
        settings = vllm_pool.settings.model_copy(update={
            "state": vllm_pool.settings.state.model_copy(update={"redis_url": redis.url}),
            "affinity": vllm_pool.settings.affinity.model_copy(update={"break_margin": 1.0})})
        urls = tuple(stack.enter_context(serve(create_app(settings, load_probe_groups(settings)),
                                               **server_options(settings.server))) for _ in range(2))
        clients = tuple(openai.OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0, timeout=300)
                        for u in urls)
        yield Replicas(urls, clients)  # type: ignore[arg-type]


def test_responses_plain_streamed_and_continued_on_the_other_replica(replicas: Replicas, vllm_pool: Pool) -> None:
    a, b = replicas.clients
    raw = a.responses.with_raw_response.create(model="router", input=QUESTION, instructions="Answer briefly.",
                                               max_output_tokens=16, temperature=0)
    backend = raw.headers["x-router-backend"]
    assert backend in vllm_pool.servers and raw.headers["x-router-reason"] != "explicit_backend"
    assert 0.0 < float(raw.headers["x-router-p-success"]) < 1.0
    first = raw.parse()
    assert first.output_text and first.usage is not None and first.usage.output_tokens > 0
    assert first.model == f"standin-{backend}"  # vLLM's own answer
    events = list(b.responses.create(model="router", input="And in May alone?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    streamed = events[-1].response
    assert streamed.usage is not None and streamed.usage.output_tokens == 8
    assert streamed.usage.input_tokens > first.usage.input_tokens  # the first turn was sent along
    third = a.responses.create(model="router", input="Thanks.", previous_response_id=streamed.id,
                               max_output_tokens=4, temperature=0)
    assert third.usage is not None and third.usage.input_tokens > streamed.usage.input_tokens
    with pytest.raises(openai.NotFoundError):
        b.responses.create(model="router", input="x", previous_response_id="resp_nothing_here", max_output_tokens=4)
    tokens = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{replicas.urls[1]}/metrics").text.splitlines()
                 if line.startswith("router_completion_tokens_total"))
    assert tokens >= 8  # usage read from response.completed of a stream


def test_chat_with_tools_and_a_tool_result_turn(replicas: Replicas) -> None:
    a, _ = replicas.clients
    question = {"role": "user", "content": "What is the weather in Paris? Use the tool."}
    called = a.chat.completions.create(model="router", messages=[question], tools=TOOLS, tool_choice="required",
                                       max_tokens=150, temperature=0)
    calls = called.choices[0].message.tool_calls
    assert called.choices[0].finish_reason == "tool_calls" and calls and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)
    messages = [question, called.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp_c": 18, "sky": "cloudy"}'}]
    raw = a.chat.completions.with_raw_response.create(model="router", messages=messages, tools=TOOLS,
                                                      max_tokens=24, temperature=0)
    answer = raw.parse()
    assert raw.headers["x-router-backend"] and (answer.choices[0].message.content
                                                or answer.choices[0].message.tool_calls)
    chunks = list(a.chat.completions.create(model="router", messages=messages, tools=TOOLS, max_tokens=8,
                                            stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason is not None


def test_responses_function_calls_continued_with_their_output(replicas: Replicas) -> None:
    a, b = replicas.clients
    called = a.responses.create(model="router", input="Weather in Paris? use the tool", tools=RESPONSES_TOOLS,
                                tool_choice="required", max_output_tokens=80, temperature=0)
    calls = [o for o in called.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    answer = b.responses.create(model="router", previous_response_id=called.id, tools=RESPONSES_TOOLS,
                                input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                        "output": '{"temp_c": 18}'}], max_output_tokens=12, temperature=0)
    assert answer.status in ("completed", "incomplete") and answer.usage is not None
    assert answer.usage.input_tokens > called.usage.input_tokens


def test_route_decides_without_forwarding(replicas: Replicas, vllm_pool: Pool) -> None:
    url = replicas.urls[0]
    decision = httpx.post(f"{url}/v1/route", timeout=60, json={
        "model": "router", "messages": [{"role": "user", "content": QUESTION}]}).json()
    assert decision["backend"] in vllm_pool.servers
    assert decision["model"] == vllm_pool.settings.backend(decision["backend"]).model
    assert set(decision["estimates"]) == set(vllm_pool.servers) and decision["scorer_ms"] > 0
    assert decision["reason"] in ("threshold_met", "fallback") and decision["threshold"] == pytest.approx(
        vllm_pool.settings.policy.threshold)
    metrics = httpx.get(f"{url}/metrics").text
    assert f'router_route_only_total{{backend="{decision["backend"]}",reason="{decision["reason"]}"}}' in metrics


def test_six_turns_stay_on_one_backend_across_replicas_and_move_when_it_goes_down(replicas: Replicas,
                                                                                 vllm_pool: Pool) -> None:
    session = {"x-session-id": "integration-six-turns"}
    messages: list[dict[str, object]] = []
    routes = []

    def turn(i: int, text: str) -> tuple[str, str]:
        messages.append({"role": "user", "content": text})
        raw = replicas.clients[i % 2].chat.completions.with_raw_response.create(
            model="router", messages=messages, max_tokens=12, temperature=0, extra_headers=session)
        messages.append({"role": "assistant", "content": raw.parse().choices[0].message.content or ""})
        return raw.headers["x-router-backend"], raw.headers["x-router-reason"]

    for i, text in enumerate([QUESTION, *FOLLOW_UPS]):
        routes.append(turn(i, text))
    pinned = routes[0][0]
    assert [b for b, _ in routes] == [pinned] * 6
    assert [r for _, r in routes[1:]] == ["affinity"] * 5  # each later turn kept by affinity, on either replica
    # a Responses conversation of the same session, answered by the pinned backend
    a, b = replicas.clients
    raw = a.responses.with_raw_response.create(model="router", input=QUESTION, max_output_tokens=8,
                                               temperature=0, extra_headers=session)
    assert (raw.headers["x-router-backend"], raw.headers["x-router-reason"]) == (pinned, "affinity")
    answered = raw.parse()
    other = next(n for n in vllm_pool.servers if n != pinned)
    vllm_pool.servers[pinned].stop()
    try:
        moved = turn(6, "Are you still there?")
        assert moved[0] == other  # failed over (or, once its circuit opened, routed afresh among the rest)
        assert turn(7, "Good.") == (other, "affinity")  # the pin moved to the backend that answered
        follow_up = b.responses.with_raw_response.create(model="router", input="And in May?", max_output_tokens=8,
                                                         previous_response_id=answered.id, temperature=0)
        assert follow_up.headers["x-router-backend"] == other and follow_up.parse().output_text is not None
    finally:
        vllm_pool.restart(pinned)
    again = a.responses.create(model="router", input="And in June?", previous_response_id=answered.id,
                               max_output_tokens=8, temperature=0)  # the stand-in that answered it is a new one
    assert again.usage is not None and again.usage.input_tokens > answered.usage.input_tokens
