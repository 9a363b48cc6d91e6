"""One completion request, resolved once: everything the layers below the HTTP edge read of it.

The edge parses a body (``router.schemas``) and identifies its key (``router.auth``); ``Resolver`` then settles,
in one place, every rule that used to be applied here and there: the threshold (the request's header, else the
configured one), the output tokens the policy prices (``max_tokens``, else ``policy.expected_output_tokens``), the
prompt the scorer reads and its text, the prompt's token estimate, and the backends the key may use. Routing,
admission and the gateway read the resulting ``Routable``; none of them looks at the configuration for these again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from router.config import PolicyConfig
from router.schemas import ChatCompletionRequest, CompletionRequest
from router.scorer.recipe import Message
from router.text_features import prompt_text

CHARS_PER_TOKEN = 4  # a prompt's tokens, estimated before any tokeniser has seen it


def estimate_tokens(text: str) -> int:
    """A prompt's tokens before any tokeniser has seen it (about four characters a token)."""
    return len(text) // CHARS_PER_TOKEN


@dataclass(frozen=True)
class Routable:
    """What routing, admission and the gateway read of one request."""

    model: str  # as the client sent it: the alias, a backend's name or its served model
    routed: bool  # the model is the alias: the probes choose the backend
    messages: tuple[Message, ...]  # what the scorer reads; empty when it cannot read the prompt (token ids)
    prompt_tokens: int  # estimated (characters / 4, or the token-id count)
    output_tokens: int  # max_tokens / max_completion_tokens, else policy.expected_output_tokens
    threshold: float  # the request's x-router-threshold, else the configured threshold
    threshold_sent: bool  # the request set its own threshold
    client: str  # the key's name ("anonymous" without keys)
    backends: frozenset[str] | None  # the backends the key may use; None: all

    @property
    def scorable(self) -> bool:
        return bool(self.messages)

    def allows(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends


@dataclass(frozen=True)
class CompletionCall:
    """A resolved completion request: what routing reads, and what is forwarded."""

    request: Routable
    path: str  # relative to a backend's base URL, e.g. "chat/completions"
    body: dict[str, Any]
    stream: bool
    client_wants_usage: bool


class Resolver:
    """Turns parsed requests into ``CompletionCall``s under one policy. ``threshold`` gives the threshold of a
    request that sets none (default: ``policy.threshold``)."""

    def __init__(self, policy: PolicyConfig, threshold: Callable[[], float] | None = None) -> None:
        self.policy = policy
        self.threshold = threshold or (lambda: policy.threshold)

    def routable(self, model: str, messages: Sequence[Message], *, prompt_tokens: int, max_tokens: int | None,
                 threshold: float | None, client: str, backends: frozenset[str] | None) -> Routable:
        return Routable(
            model=model,
            routed=model == self.policy.alias,
            messages=tuple(messages),
            prompt_tokens=prompt_tokens,
            output_tokens=max_tokens or self.policy.expected_output_tokens,
            threshold=self.threshold() if threshold is None else threshold,
            threshold_sent=threshold is not None,
            client=client,
            backends=backends,
        )

    def chat(self, body: dict[str, Any], req: ChatCompletionRequest, *, threshold: float | None, client: str,
             backends: frozenset[str] | None) -> CompletionCall:
        messages = body["messages"]
        routable = self.routable(req.model, messages, prompt_tokens=estimate_tokens(prompt_text(messages)),
                                 max_tokens=req.max_completion_tokens or req.max_tokens, threshold=threshold,
                                 client=client, backends=backends)
        return CompletionCall(routable, "chat/completions", body, req.stream, _wants_usage(req))

    def completion(self, body: dict[str, Any], req: CompletionRequest, *, threshold: float | None, client: str,
                   backends: frozenset[str] | None) -> CompletionCall:
        text = completion_text(req.prompt)
        messages = [{"role": "user", "content": text}] if text is not None else []
        tokens = estimate_tokens(text) if text is not None else _token_count(req.prompt)
        routable = self.routable(req.model, messages, prompt_tokens=tokens, max_tokens=req.max_tokens,
                                 threshold=threshold, client=client, backends=backends)
        return CompletionCall(routable, "completions", body, req.stream, _wants_usage(req))


def _wants_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def completion_text(prompt: str | list[Any]) -> str | None:
    """The text the scorer reads of a /v1/completions prompt; None for token-id prompts, which it cannot read."""
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return None


def _token_count(prompt: list[Any]) -> int:
    """Tokens of a token-id prompt (one list, or a batch of lists)."""
    return sum(len(p) if isinstance(p, list) else 1 for p in prompt)
