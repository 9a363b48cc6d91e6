"""The "also" items of issue 16 that are about what leaks or breaks: deep JSON, backend addresses in 502s,
upstream redirects, credentials in backend URLs. Against a real gateway on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse

from router.config import ConfigError, ScorerConfig, load_settings
from router.scorer.features import FeatureExtractor
from tests.support.servers import FakeBackend, free_port, serve
from tests.support.stack import make_settings, running_gateway

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.mark.parametrize("depth", [254, 300, 900])
def test_json_nested_too_deep_to_forward_is_a_400(depth: int, tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
                                                   tiny_extractor: FeatureExtractor) -> None:
    small = FakeBackend("org/small")
    with serve(small.app) as small_url, serve(FakeBackend("org/large").app) as large_url:
        settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url)
        with running_gateway(settings) as url:
            body = b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "x": ' + \
                b"[" * depth + b"]" * depth + b"}"
            r = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=30)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "invalid_json" and "Traceback" not in r.text
            assert small.received == []


def test_a_502_names_the_backend_never_its_address(tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
                                                   tiny_extractor: FeatureExtractor) -> None:
    port = free_port()  # nothing listens here
    with serve(FakeBackend("org/small").app) as small_url:
        settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url,
                                 f"http://127.0.0.1:{port}")
        with running_gateway(settings) as url:
            r = httpx.post(f"{url}/v1/chat/completions", json={"model": "large", "messages": MESSAGES}, timeout=30)
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert "backend large" in message
    assert str(port) not in r.text and "127.0.0.1" not in r.text and "ConnectionKey" not in r.text


def test_upstream_redirects_are_not_followed(tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
                                             tiny_extractor: FeatureExtractor) -> None:
    """A backend (or something in its place) answering 307 elsewhere: the gateway does not go there, so the
    backend's key, which it sends, cannot be carried to another host; the request fails over or gets a 502."""
    elsewhere = FakeBackend("org/elsewhere")
    redirector = FastAPI()
    seen: list[str] = []

    async def redirect(request: Request, rest: str) -> RedirectResponse:
        seen.append(request.headers.get("authorization", ""))
        return RedirectResponse(f"{elsewhere_url}/v1/{rest}", status_code=307)

    redirector.add_api_route("/v1/{rest:path}", redirect, methods=["POST", "GET"])
    redirector.add_api_route("/health", redirect, methods=["GET"])
    small = FakeBackend("org/small", "small says 4")
    with serve(elsewhere.app) as elsewhere_url, serve(redirector) as redirect_url, serve(small.app) as small_url:
        settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, redirect_url,
                                 large={"api_key_env": "TEST_LARGE_KEY"})
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TEST_LARGE_KEY", "sk-backend-secret")
            with running_gateway(settings) as url:
                named = httpx.post(f"{url}/v1/chat/completions", json={"model": "large", "messages": MESSAGES})
                routed = httpx.post(f"{url}/v1/chat/completions", json={"model": "router", "messages": MESSAGES})
    assert named.status_code == 502 and "redirect" in named.json()["error"]["message"]
    assert routed.status_code == 200 and routed.headers["x-router-backend"] == "small"
    assert seen and all(a == "Bearer sk-backend-secret" for a in seen)  # the redirector itself got the key…
    assert elsewhere.received == []  # …but nothing, and so no key, went where it pointed


def test_credentials_in_a_backend_url_are_refused_at_load(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "backends:\n"
        "  - {name: b, base_url: 'http://user:secret@127.0.0.1:8001/v1', model: m, input_cost_per_mtok: 1,\n"
        "     output_cost_per_mtok: 1, probe: p.json, api_key_env: B_KEY}\n"
    )
    with pytest.raises(ConfigError, match="credentials in the URL are not accepted") as err:
        load_settings(config)
    assert "secret" not in str(err.value)
