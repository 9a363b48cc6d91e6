"""The gateway over real HTTP, in front of small OpenAI-compatible backends of our own on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from tests.support.servers import FakeBackend, free_port, serve
from tests.support.stack import Stack, fake_stack, make_settings, running_gateway

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_scorer_cfg: ScorerConfig,
          tiny_extractor: FeatureExtractor) -> Iterator[Stack]:
    with fake_stack(tmp_path_factory.mktemp("probes"), tiny_scorer_cfg, tiny_extractor.info) as stack:
        yield stack


def test_routed_chat_goes_to_the_cheapest_backend_clearing_the_threshold(stack: Stack) -> None:
    raw = stack.client.chat.completions.with_raw_response.create(model="router", messages=MESSAGES)
    assert raw.headers["x-router-backend"] == "large"  # small's 0.70 < 0.8 ≤ large's 0.95
    assert raw.headers["x-router-reason"] == "threshold_met"
    assert float(raw.headers["x-router-p-success"]) == pytest.approx(0.95, abs=1e-4)
    assert float(raw.headers["x-router-scorer-ms"]) > 0
    assert raw.parse().choices[0].message.content == "large says 4"
    assert stack.large.received[-1]["model"] == "org/large"


def test_threshold_header_changes_the_route(stack: Stack) -> None:
    raw = stack.client.chat.completions.with_raw_response.create(
        model="router", messages=MESSAGES, extra_headers={"x-router-threshold": "0.5"})
    assert raw.headers["x-router-backend"] == "small"
    assert raw.parse().choices[0].message.content == "small says 4"


def test_naming_a_backend_skips_the_scorer(stack: Stack) -> None:
    scored_before = stack.metric("router_scorer_batch_size_sum")
    for model in ("small", "org/small"):
        raw = stack.client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
        assert raw.headers["x-router-backend"] == "small"
        assert raw.headers["x-router-reason"] == "explicit_backend"
        assert "x-router-p-success" not in raw.headers and "x-router-scorer-ms" not in raw.headers
    assert stack.metric("router_scorer_batch_size_sum") == scored_before


def test_stream_passes_chunks_through_with_usage_when_asked(stack: Stack) -> None:
    raw = stack.client.chat.completions.with_raw_response.create(
        model="router", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-router-backend"] == "large"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "large says 4"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


def test_stream_without_usage_asks_the_backend_but_hides_the_usage_chunk(stack: Stack) -> None:
    tokens_before = stack.metric('router_completion_tokens_total{backend="large"}')
    chunks = list(stack.client.chat.completions.create(model="router", messages=MESSAGES, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    assert stack.large.received[-1]["stream_options"] == {"include_usage": True}
    assert stack.metric('router_completion_tokens_total{backend="large"}') == tokens_before + 7


def test_completions_are_routed_on_the_prompt(stack: Stack) -> None:
    raw = stack.client.completions.with_raw_response.create(model="router", prompt="2 + 2 =", max_tokens=5)
    assert raw.headers["x-router-backend"] == "large"
    assert raw.parse().choices[0].text == "large says 4"
    assert stack.large.received[-1]["prompt"] == "2 + 2 ="


def test_fields_the_gateway_does_not_know_pass_through(stack: Stack) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    stack.client.chat.completions.create(model="small", messages=MESSAGES, tools=tools, n=2, logprobs=True,
                                         extra_body={"top_k": 5, "repetition_penalty": 1.1})
    body = stack.small.received[-1]
    assert body["tools"] == tools and body["n"] == 2 and body["logprobs"] is True
    assert body["top_k"] == 5 and body["repetition_penalty"] == 1.1


def test_models_lists_the_alias_and_every_backend(stack: Stack) -> None:
    assert [m.id for m in stack.client.models.list()] == ["router", "small", "large"]


def test_cost_and_tokens_are_counted_from_the_backends_usage(stack: Stack) -> None:
    before = stack.metric('router_cost_usd_total{backend="small"}')
    stack.client.chat.completions.create(model="small", messages=MESSAGES)
    # 11 prompt tokens at $1/Mtok + 7 completion tokens at $2/Mtok
    assert stack.metric('router_cost_usd_total{backend="small"}') - before == pytest.approx(25e-6)


def test_health_and_ready(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/ready")
    assert ready.status_code == 200
    assert ready.json()["backends"] == {"small": {"healthy": True, "circuit": "closed"},
                                        "large": {"healthy": True, "circuit": "closed"}}


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "fragment"),
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (b"[1, 2]", {}, 400, "must be a JSON object"),
        (b'{"model": "router"}', {}, 400, "messages: Field required"),
        (b'{"model": "router", "messages": []}', {}, 400, "messages: List should have at least 1 item"),
        (b'{"model": "router", "messages": "hi"}', {}, 400, "messages"),
        (b'{"model": "router", "messages": [{"content": "hi"}]}', {}, 400, "messages.0.role"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', {}, 400, "model"),
        (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', {}, 404, "'gpt-9' does not exist"),
        (b'{"model": "router", "messages": [{"role": "user", "content": "hi"}]}', {"x-router-threshold": "high"},
         400, "x-router-threshold must be a number between 0 and 1"),
        (b'{"model": "router", "messages": [{"role": "user", "content": "hi"}]}', {"x-router-threshold": "1.5"},
         400, "x-router-threshold"),
        (b'{"model": "router", "messages": [{"role": "user", "content": "' + b"x" * 70000 + b'"}]}', {}, 413,
         "larger than 65536 bytes"),
    ],
)
def test_bad_input_gets_an_openai_error(stack: Stack, body: bytes, headers: dict[str, str], status: int,
                                        fragment: str) -> None:
    response = httpx.post(f"{stack.url}/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == status
    assert fragment in str(error_of(response)["message"])


def test_unknown_routes_and_methods_get_openai_errors(stack: Stack) -> None:
    assert error_of(httpx.get(f"{stack.url}/v1/nothing"))["type"] == "not_found_error"
    assert httpx.get(f"{stack.url}/v1/chat/completions").status_code == 405


def test_a_backend_that_refuses_connections_fails_over(tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
                                                       tiny_extractor: FeatureExtractor) -> None:
    small = FakeBackend("org/small", "small answers")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    with serve(small.app) as small_url:
        settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, closed)
        with running_gateway(settings) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(model="router", messages=MESSAGES)
            assert raw.headers["x-router-backend"] == "small"
            assert raw.headers["x-router-reason"] == "failover"
            assert raw.parse().choices[0].message.content == "small answers"
            ready = httpx.get(f"{url}/ready").json()
            assert ready["backends"]["small"] == {"healthy": True, "circuit": "closed"}
            assert ready["backends"]["large"]["healthy"] is False
            with pytest.raises(openai.APIStatusError) as err:  # named explicitly: no failover, a clear 502
                client.chat.completions.create(model="large", messages=MESSAGES)
            assert err.value.status_code == 502


def test_a_chunked_body_is_read_whole_and_bounded(stack: Stack) -> None:
    body = orjson.dumps({"model": "small", "messages": MESSAGES})
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
    response = httpx.post(f"{stack.url}/v1/chat/completions", content=iter(pieces))  # no content-length
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "small says 4"
    too_big = httpx.post(f"{stack.url}/v1/chat/completions", content=iter([b"x" * 40000, b"x" * 40000]))
    assert too_big.status_code == 413 and "larger than 65536 bytes" in str(error_of(too_big)["message"])
