"""One completion request, resolved once: everything the layers below the HTTP edge read of it.

The edge parses a body (``router.schemas``, ``router.responses``) and identifies its key (``router.auth``);
``Resolver`` then settles, in one place, every rule that used to be applied here and there: the threshold (the
request's header, else the configured one), the output tokens the policy prices (``max_tokens``,
``max_completion_tokens`` or ``max_output_tokens``, else ``policy.expected_output_tokens``), the prompt the scorer
reads and its text, the prompt's token estimate, the backends the key may use, the session a routed request belongs
to (``router.affinity``) and the API's wire protocol (``router.protocols``). Routing, admission and the gateway read
the resulting ``Routable``; none of them looks at the configuration for these again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.affinity import Session, session_of
from router.config import AffinityConfig, PolicyConfig
from router.protocols import PROTOCOLS, UpstreamProtocol
from router.responses import ResponsesCall, ResponsesRequest
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
    session: Session | None = None  # the conversation a routed request belongs to (affinity); None: none, or off

    @property
    def scorable(self) -> bool:
        return bool(self.messages)

    def allows(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends


@dataclass(frozen=True)
class CompletionCall:
    """A resolved completion request: what routing reads, and what is forwarded."""

    request: Routable
    protocol: UpstreamProtocol  # how it is forwarded and its answer read (router.protocols)
    body: dict[str, Any]  # what is forwarded (its model replaced by the backend's)
    stream: bool
    client_wants_usage: bool
    conversation: ResponsesCall | None = None  # a Responses request: the conversation to record after its answer

    @property
    def path(self) -> str:
        """Relative to a backend's base URL, e.g. "chat/completions"."""
        return self.protocol.name


NO_HEADERS: Mapping[str, str] = {}


class Resolver:
    """Turns parsed requests into ``CompletionCall``s under one policy. ``threshold`` gives the threshold of a
    request that sets none (default: ``policy.threshold``); ``affinity`` (when enabled) names the sessions of
    routed requests."""

    def __init__(self, policy: PolicyConfig, threshold: Callable[[], float] | None = None,
                 affinity: AffinityConfig | None = None) -> None:
        self.policy = policy
        self.threshold = threshold or (lambda: policy.threshold)
        self.affinity = affinity if affinity is not None and affinity.enabled else None
        self.protocols = {path: cls(path) for path, cls in PROTOCOLS.items()}

    def session(self, model: str, headers: Mapping[str, str], body: Mapping[str, Any], messages: Sequence[Message],
                client: str) -> Session | None:
        """The session of a routed request (``router.affinity.session_of``, scoped by the key); None for a request
        naming a backend (affinity does not apply to it) or with affinity off."""
        if self.affinity is None or model != self.policy.alias:
            return None
        return session_of(headers, body, messages, owner=client, header=self.affinity.header,
                          sources=self.affinity.sources)

    def routable(self, model: str, messages: Sequence[Message], *, prompt_tokens: int, max_tokens: int | None,
                 threshold: float | None, client: str, backends: frozenset[str] | None,
                 session: Session | None = None) -> Routable:
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
            session=session,
        )

    def chat(self, body: dict[str, Any], req: ChatCompletionRequest, *, threshold: float | None, client: str,
             backends: frozenset[str] | None, headers: Mapping[str, str] = NO_HEADERS) -> CompletionCall:
        messages = body["messages"]
        routable = self.routable(req.model, messages, prompt_tokens=estimate_tokens(prompt_text(messages)),
                                 max_tokens=req.max_completion_tokens or req.max_tokens, threshold=threshold,
                                 client=client, backends=backends,
                                 session=self.session(req.model, headers, body, messages, client))
        return CompletionCall(routable, self.protocols["chat/completions"], body, req.stream, _wants_usage(req))

    def completion(self, body: dict[str, Any], req: CompletionRequest, *, threshold: float | None, client: str,
                   backends: frozenset[str] | None, headers: Mapping[str, str] = NO_HEADERS) -> CompletionCall:
        text = completion_text(req.prompt)
        messages = [{"role": "user", "content": text}] if text is not None else []
        tokens = estimate_tokens(text) if text is not None else _token_count(req.prompt)
        routable = self.routable(req.model, messages, prompt_tokens=tokens, max_tokens=req.max_tokens,
                                 threshold=threshold, client=client, backends=backends,
                                 session=self.session(req.model, headers, body, messages, client))
        return CompletionCall(routable, self.protocols["completions"], body, req.stream, _wants_usage(req))

    def responses(self, call: ResponsesCall, req: ResponsesRequest, *, threshold: float | None, client: str,
                  backends: frozenset[str] | None, headers: Mapping[str, str] = NO_HEADERS) -> CompletionCall:
        """A Responses request made self-contained (``router.responses.prepare``: a ``previous_response_id``
        already expanded): routed on its conversation's messages, priced at its ``max_output_tokens``."""
        messages = call.messages
        routable = self.routable(req.model, messages, prompt_tokens=estimate_tokens(prompt_text(messages)),
                                 max_tokens=req.max_output_tokens, threshold=threshold, client=client,
                                 backends=backends, session=self.session(req.model, headers, call.body, messages,
                                                                         client))
        return CompletionCall(routable, self.protocols["responses"], call.body, req.stream, False, conversation=call)


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
