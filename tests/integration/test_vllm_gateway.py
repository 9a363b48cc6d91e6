"""End to end: the official openai client → the gateway (real scorer, shipped probes) → real vLLM CPU servers."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import Pool

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half "
             "as many clips in May. How many clips did Natalia sell altogether in April and May? Let's think step "
             "by step and output the final answer within \\boxed{}."}]


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_is_routed_and_answered_by_vllm(client: openai.OpenAI, vllm_pool: Pool) -> None:
    raw = client.chat.completions.with_raw_response.create(model="router", messages=QUESTION, max_tokens=16)
    backend = raw.headers["x-router-backend"]
    assert backend in vllm_pool.servers
    assert 0.0 < float(raw.headers["x-router-p-success"]) < 1.0
    assert float(raw.headers["x-router-scorer-ms"]) > 0
    completion = raw.parse()
    assert completion.model == f"standin-{backend}"  # vLLM's own answer, naming the server that wrote it
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_streaming_chat_with_usage(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="router", messages=QUESTION, max_tokens=16, stream=True, stream_options={"include_usage": True})
    backend = raw.headers["x-router-backend"]
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert all(c.model == f"standin-{backend}" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_completions(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model="router", prompt="The capital of France is",
                                                      max_tokens=8, temperature=0)
    assert raw.headers["x-router-backend"]
    assert raw.parse().choices[0].text


def test_models(client: openai.OpenAI, vllm_pool: Pool) -> None:
    assert [m.id for m in client.models.list()] == ["router", *vllm_pool.servers]


def test_the_threshold_changes_the_route(client: openai.OpenAI, vllm_pool: Pool) -> None:
    cheap, dear = (b.name for b in vllm_pool.settings.backends)
    routes = {}
    for threshold in ("0", "1"):
        raw = client.chat.completions.with_raw_response.create(
            model="router", messages=QUESTION, max_tokens=4, extra_headers={"x-router-threshold": threshold})
        routes[threshold] = (raw.headers["x-router-backend"], raw.headers["x-router-reason"])
    assert routes["0"] == (cheap, "threshold_met")  # every estimate clears 0: the cheapest backend
    assert routes["1"] == (dear, "fallback")  # none clears 1: the configured fallback


def test_naming_a_backend_skips_the_scorer(client: openai.OpenAI, gateway_url: str, vllm_pool: Pool) -> None:
    def forward_passes() -> float:
        lines = httpx.get(f"{gateway_url}/metrics").text.splitlines()
        return next(float(line.split()[-1]) for line in lines if line.startswith("router_scorer_batch_size_count"))

    before = forward_passes()
    dear = vllm_pool.settings.backends[-1]
    raw = client.chat.completions.with_raw_response.create(model=dear.name, messages=QUESTION, max_tokens=4)
    assert raw.headers["x-router-backend"] == dear.name
    assert raw.headers["x-router-reason"] == "explicit_backend"
    assert "x-router-p-success" not in raw.headers
    assert raw.parse().model == f"standin-{dear.name}"
    assert forward_passes() == before
