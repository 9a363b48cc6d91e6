"""The ``vllm`` scorer: a vLLM server running the scorer model with the pooling runner, over HTTP.

The server serves the model cut after the probed block (``python -m router prepare`` writes that checkpoint
and prints the command), with LAST or MEAN pooling and no normalisation, so the pooled vector it returns is
the recipe's ``final_norm`` reading of that block. For ``last+mean`` the server runs the ``token_embed`` task
(ALL pooling) and returns every prompt token's state from ``/pooling``; the gateway pools both ways itself.
The gateway renders and tokenises (``router.scorer.prompt``, shared with the local scorer) and sends token
ids, so truncation and the template are the same by construction; vLLM's continuous batching does the
batching. This process loads no model.

Keys share the server by tokens: at most ``scorer.max_key_tokens_in_flight`` of one key's prompt tokens are at the
server at once (``router.scorer.fair.TokenBudget``); a key's further requests wait for its own to come back, before
they are sent, so a key flooding the server with long prompts queues behind itself. There is no early exit here:
the server's pass always runs to the configured block (``early_exit_info`` is None).

A server that refuses connections or fails is counted by a circuit breaker: after a few failures requests go
unscored at once (``down``) instead of trying, one trial request goes through after the cooldown, and a
success closes the circuit again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp
import numpy as np
import orjson

from router.breaker import Breaker
from router.config import ScorerConfig
from router.scorer.cpu import compute_dtype
from router.scorer.fair import TokenBudget
from router.scorer.interface import BatchStats, EarlyExit, Scored, ScorerUnavailable
from router.scorer.prompt import PromptEncoder
from router.scorer.recipe import Message, ScorerInfo, describe
from router.scorer.source import resolve_model
from router.upstream import check_health

log = logging.getLogger(__name__)

POOLERS = {
    "last": {"pooling_type": "LAST", "use_activation": False},
    "mean": {"pooling_type": "MEAN", "use_activation": False},
    # every token's state from /pooling; the gateway takes the last and the mean
    "last+mean": {"task": "token_embed", "pooling_type": "ALL", "use_activation": False},
}


def vllm_pooling_args(cfg: ScorerConfig) -> list[str]:
    """The vLLM server arguments that make it return this recipe's features (the model folder aside)."""
    pooler = POOLERS[cfg.pooling]
    return ["--runner", "pooling", "--convert", "embed", "--pooler-config", json.dumps(pooler),
            "--served-model-name", cfg.served_model, "--dtype", compute_dtype(cfg)]


class VllmScorer:
    def __init__(self, cfg: ScorerConfig) -> None:
        if cfg.url is None:
            raise ValueError("scorer.kind 'vllm' needs scorer.url")
        folder = resolve_model(cfg.model, cfg.cache_dir)  # the tokenizer, template and weights' digest only
        model_cfg = json.loads((folder.path / "config.json").read_text())
        hidden = int(model_cfg.get("text_config", model_cfg)["hidden_size"])
        self.cfg = cfg
        self.encoder = PromptEncoder(folder.path, cfg.max_prompt_tokens, conversation=cfg.conversation,
                                     context_tokens=cfg.context_tokens)
        self.info: ScorerInfo = describe(
            model=folder.name, weights_sha256=folder.weights_sha256, template=self.encoder.template,
            layers=cfg.layers, pooling=cfg.pooling, final_norm=cfg.final_norm, hidden_size=hidden)
        self.per_token = cfg.pooling == "last+mean"
        base = str(cfg.url).rstrip("/")
        self.endpoint = base.removesuffix("/v1") + "/pooling" if self.per_token else base + "/embeddings"
        self.health_url = str(aiohttp.client.URL(str(cfg.url)).with_path("/health").with_query(None))
        self.breaker = Breaker(cfg.failure_threshold, cfg.cooldown_s)
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._shares = TokenBudget(cfg.max_key_tokens_in_flight)

    async def start(self, on_batch: Callable[[BatchStats], None] | None = None) -> None:
        """Open the connection pool (``on_batch`` is not called: vLLM batches, and exports its own metrics)."""
        connector = aiohttp.TCPConnector(limit=self.cfg.max_in_flight, limit_per_host=0)
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s))
        self._slots = asyncio.Semaphore(self.cfg.max_in_flight)

    async def score(self, messages: Sequence[Message], timeout_s: float | None = None, *, key: str = "",
                    early: EarlyExit | None = None, ids: Sequence[int] | None = None) -> Scored:
        """``early`` is not honoured (``early_exit_info``): the full features come back, ``early`` None."""
        if self._session is None or self._slots is None:
            raise ScorerUnavailable("stopped", "scorer is not started")
        if not self.breaker.available():
            raise ScorerUnavailable("down", f"the scorer at {self.cfg.url} is failing; retrying after "
                                    f"{self.cfg.cooldown_s:g}s")
        start = time.perf_counter()
        if ids is None:
            ids = await self.encoder.encode_async(messages)
        ids = list(ids)
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                await self._shares.acquire(key, len(ids))
        except TimeoutError as e:
            raise ScorerUnavailable("key_share", f"this key's prompts already at the scorer did not come back "
                                    f"within {timeout_s:g}s") from e
        try:
            return await self._post(ids, start, deadline, timeout_s)
        finally:
            self._shares.release(key, len(ids))

    def early_exit_info(self, layer: int) -> ScorerInfo | None:
        return None

    async def _post(self, ids: list[int], start: float, deadline: float | None, timeout_s: float | None) -> Scored:
        assert self._session is not None and self._slots is not None
        request = {"model": self.cfg.served_model, "input": [ids], "encoding_format": "base64"}
        if self.per_token:
            request["task"] = "token_embed"
        body = orjson.dumps(request)
        try:
            async with asyncio.timeout_at(deadline):
                async with self._slots:
                    queued = time.perf_counter() - start
                    self.breaker.begin()
                    async with self._session.post(self.endpoint, data=body) as response:
                        payload = await response.read()
                        status = response.status
        except TimeoutError as e:
            self.breaker.failure()
            raise ScorerUnavailable("timeout", f"scorer took longer than {timeout_s:g}s") from e
        except aiohttp.ClientError as e:
            self.breaker.failure()
            raise ScorerUnavailable("failed", f"scorer unreachable: {e!r}") from e
        if status != 200:
            self.breaker.failure()
            raise ScorerUnavailable("failed", f"scorer answered HTTP {status}: {payload[:200]!r}")
        features = self._parse(payload, len(ids))
        self.breaker.success()
        return Scored(features, prompt_tokens=len(ids), queue_s=queued, total_s=time.perf_counter() - start)

    def _parse(self, payload: bytes, tokens: int) -> np.ndarray:
        try:
            item = orjson.loads(payload)["data"][0]
            values = np.frombuffer(base64.b64decode(item["data" if self.per_token else "embedding"]), dtype="<f4")
            if self.per_token:  # one row per prompt token: the last row, and the mean of all
                states = values.reshape(tokens, -1)
                values = np.concatenate([states[-1], states.mean(axis=0, dtype=np.float64)])
            features = values.astype(np.float32)
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
            self.breaker.failure()
            raise ScorerUnavailable("failed", f"scorer answered something other than one embedding: {e!r}") from e
        if features.shape != (self.info.feature_dim,):
            self.breaker.failure()
            raise ScorerUnavailable("failed", f"scorer returned {features.shape[0]} values, the recipe needs "
                                    f"{self.info.feature_dim}: is it serving {self.info.model} with "
                                    f"{self.cfg.pooling} pooling?")
        return features

    @property
    def alive(self) -> bool:
        return self._session is not None and self.breaker.available()

    async def check(self) -> bool:
        """GET the server's /health; a pass lets an open circuit try again at once, a failure counts."""
        if self._session is None:
            return False
        ok = await check_health(self._session, self.health_url, self.breaker, self.cfg.connect_timeout_s)
        return ok and self.breaker.available()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
