"""Finding 5 and the "also" items of issue 16 that concern keys: a per-key policy (backends, threshold and
backend rights, the vLLM extras it may send, caps, request and token budgets), wrong keys throttled per client
address, and feedback only by the key that received the answer. Against a real gateway on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from tests.support.servers import FakeBackend, serve
from tests.support.stack import make_settings, running_gateway

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
TENANT = {"authorization": "Bearer sk-tenant"}
ADMIN = {"authorization": "Bearer sk-admin"}
LEGACY = {"authorization": "Bearer sk-legacy"}


@dataclass
class Keys:
    url: str
    small: FakeBackend
    large: FakeBackend

    def chat(self, headers: dict[str, str], **body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json={"model": "router", "messages": MESSAGES, **body},
                          headers=headers, timeout=30)

    def received(self) -> int:
        return len(self.small.received) + len(self.large.received)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, tiny_scorer_cfg: ScorerConfig,
         tiny_extractor: FeatureExtractor) -> Iterator[Keys]:
    small, large = FakeBackend("org/small", "small says 4"), FakeBackend("org/large", "large says 4")
    with serve(small.app) as small_url, serve(large.app) as large_url:
        settings = make_settings(
            tmp_path_factory.mktemp("keys"), tiny_scorer_cfg, tiny_extractor.info, small_url, large_url,
            server={"max_body_bytes": 1 << 20},
            auth={
                "api_keys": ["sk-legacy"],
                "failed_auth_per_minute": 1000,
                "keys": [
                    {"name": "tenant", "key": "sk-tenant", "backends": ["small"], "max_n": 2,
                     "max_output_tokens": 100, "tokens_per_minute": 5000},
                    {"name": "admin", "key": "sk-admin", "may_name_backend": True, "may_override_threshold": True,
                     "allowed_extras": ["chat_template"]},
                ],
            },
        )
        with running_gateway(settings) as url:
            yield Keys(url, small, large)


@pytest.mark.parametrize(
    ("body", "headers", "status", "param"),
    [
        ({"model": "large"}, {}, 403, "model"),  # force the dear backend by name
        ({"model": "org/large"}, {}, 403, "model"),  # or by its served model
        ({}, {"x-router-threshold": "1"}, 403, "x-router-threshold"),  # or by a threshold nothing clears
        ({"chat_template": "{{ 7 * 7 }}"}, {}, 403, "chat_template"),
        ({"logits_processors": ["os.system"]}, {}, 403, "logits_processors"),
        ({"kv_transfer_params": {"remote_host": "10.0.0.1"}}, {}, 403, "kv_transfer_params"),
        ({"n": 64}, {}, 400, "n"),
        ({"best_of": 64}, {}, 400, "best_of"),
        ({"max_tokens": 1_000_000}, {}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]},
         {}, 403, "messages"),
    ],
)
def test_a_key_is_held_to_its_policy_and_nothing_refused_reaches_a_backend(
        keys: Keys, body: dict[str, Any], headers: dict[str, str], status: int, param: str) -> None:
    before = keys.received()
    r = keys.chat({**TENANT, **headers}, **body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert keys.received() == before


def test_a_token_id_prompt_cannot_be_used_to_pick_the_unscored_backend(keys: Keys) -> None:
    r = httpx.post(f"{keys.url}/v1/completions", json={"model": "router", "prompt": [1, 2, 3]}, headers=TENANT)
    assert r.status_code == 403 and r.json()["error"]["param"] == "prompt"


def test_routed_requests_stay_within_the_keys_backends(keys: Keys) -> None:
    r = keys.chat(TENANT)  # the probes prefer large (0.95 vs 0.70 < 0.8); the tenant may only use small
    assert r.status_code == 200 and r.headers["x-router-backend"] == "small"
    assert r.json()["choices"][0]["message"]["content"] == "small says 4"


def test_a_key_allowed_an_extra_passes_it_through_and_ordinary_fields_always_pass(keys: Keys) -> None:
    r = keys.chat(ADMIN, model="large", chat_template="{{ messages }}", top_k=5, n=2)
    assert r.status_code == 200
    assert keys.large.received[-1]["chat_template"] == "{{ messages }}" and keys.large.received[-1]["top_k"] == 5
    assert keys.chat(ADMIN, logits_processors=["x"]).status_code == 403  # only the extras it was given


def test_keys_from_api_keys_keep_their_rights(keys: Keys) -> None:
    """auth.api_keys still works as before: may name a backend and set the threshold; dangerous extras denied."""
    r = keys.chat(LEGACY, model="large")
    assert r.status_code == 200 and r.headers["x-router-backend"] == "large"
    assert httpx.post(f"{keys.url}/v1/chat/completions", headers={**LEGACY, "x-router-threshold": "0.5"},
                      json={"model": "router", "messages": MESSAGES}).headers["x-router-backend"] == "small"
    assert keys.chat(LEGACY, chat_template="x").status_code == 403


def test_the_token_budget_counts_prompts_and_outputs_so_huge_prompts_cost_their_sender(keys: Keys) -> None:
    big = [{"role": "user", "content": "eggs " * 8000}]  # ≈ 10,000 tokens: more than the whole minute's 5,000
    r = keys.chat(TENANT, messages=big)
    assert r.status_code == 429 and r.json()["error"]["code"] == "token_budget_exceeded"
    keys.small.USAGE = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}  # as reported
    try:
        answers = [keys.chat(TENANT, messages=[{"role": "user", "content": "x" * 4000}], max_tokens=100)
                   for _ in range(6)]  # 1,100 tokens each, estimated and then reported
    finally:
        del keys.small.USAGE
    assert [a.status_code for a in answers[:4]] == [200] * 4
    spent = answers[-1]
    assert spent.status_code == 429 and int(spent.headers["retry-after"]) >= 1
    assert keys.chat(ADMIN).status_code == 200  # another key's budget is its own


def test_feedback_only_by_the_key_that_received_the_answer(keys: Keys) -> None:
    answer = keys.chat(ADMIN)
    request_id = answer.headers["x-router-request-id"]
    other = httpx.post(f"{keys.url}/v1/feedback", json={"id": request_id, "correct": False}, headers=LEGACY)
    assert other.status_code == 404  # as for an unknown id: another key's answers cannot even be probed
    mine = httpx.post(f"{keys.url}/v1/feedback", json={"id": request_id, "correct": True}, headers=ADMIN)
    assert mine.status_code == 200 and mine.json()["score"] == 1.0


def test_wrong_keys_are_throttled_per_client_address(tmp_path, tiny_scorer_cfg: ScorerConfig,  # type: ignore[no-untyped-def]
                                                     tiny_extractor: FeatureExtractor) -> None:
    with serve(FakeBackend("org/small").app) as small_url, serve(FakeBackend("org/large").app) as large_url:
        settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url,
                                 auth={"api_keys": ["sk-right"], "failed_auth_per_minute": 6})
        with running_gateway(settings) as url:
            guesses = [httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer sk-guess-{i}"})
                       for i in range(12)]
            assert [g.status_code for g in guesses[:10]] == [401] * 10  # the burst
            assert {g.status_code for g in guesses[10:]} == {429}
            assert int(guesses[-1].headers["retry-after"]) >= 1
            # while throttled, no key is even compared: a right guess cannot be told from a wrong one
            assert httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer sk-right"}).status_code == 429
            assert httpx.get(f"{url}/health").status_code == 200
