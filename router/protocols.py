"""What differs, on the wire to a backend, between the OpenAI APIs the gateway forwards: one object per API.

The gateway forwards every API the same way (route, open, fail over before the first byte, relay, count); only
three things depend on which API a request speaks, and they live here, nowhere else:

- the body sent upstream (``upstream_body``): chat and text completions that stream without the client asking for
  usage get ``stream_options.include_usage`` added, so the gateway can count tokens and cost; the Responses API
  always reports usage (in ``response.completed``) and gets nothing added;
- how an answer's outcome is read (``outcome_of_body`` for a JSON answer; a ``StreamReader`` per relayed stream,
  ``reader``): chat's usage sits in the body or in a usage-only chunk (dropped when the gateway asked for it and
  the client did not), the Responses API's in the response object or its terminal event, which also carries the
  final response the gateway records for ``previous_response_id``;
- the event that ends a stream broken off mid-way (``error_event``): chat clients read an ``{"error": …}`` data
  line, Responses clients an ``error`` event.

``PROTOCOLS`` maps each forwarded path to its protocol's class (as RouteLLM's name → router table); a resolved
request (``router.request.CompletionCall``) carries its protocol, made once per path by the ``Resolver``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import orjson

from router.responses import ResponsesTap, outcome_of_responses_body
from router.upstream import Outcome, Usage

__all__ = ["PROTOCOLS", "ChatProtocol", "ChatReader", "ResponsesProtocol", "ResponsesReader", "UpstreamProtocol"]


def _usage_and_id(payload: bytes) -> tuple[Usage | None, str | None, bool] | None:
    """(usage, completion id, whether it has no choices) of one JSON answer or chunk; None if not an object."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    completion_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    return Usage.from_json(doc.get("usage")), completion_id, not doc.get("choices")


class ChatReader:
    """A chat or text completion stream: usage and id from the chunk that reports usage, which is dropped when
    ``drop_usage_event`` (the gateway asked for it, the client did not)."""

    def __init__(self, drop_usage_event: bool) -> None:
        self.drop_usage_event = drop_usage_event
        self._outcome = Outcome()

    def feed(self, event: bytes) -> bool:
        if b'"usage"' not in event:
            return True
        found = _usage_and_id(event.partition(b"data:")[2].strip())
        if found is None:
            return True
        usage, completion_id, no_choices = found
        if usage is not None:
            self._outcome.usage, self._outcome.completion_id = usage, completion_id
        return not (self.drop_usage_event and usage is not None and no_choices)

    def outcome(self) -> Outcome:
        return self._outcome

    finished = False

    @staticmethod
    def error_event(message: str) -> bytes:
        body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": "stream_interrupted"}}
        return b"data: " + orjson.dumps(body) + b"\n\n"


class ResponsesReader:
    """A Responses stream (``router.responses.ResponsesTap``): every event passes; the terminal one gives usage,
    the response id and the final response."""

    def __init__(self) -> None:
        self.tap = ResponsesTap()
        self.events = 0

    def feed(self, event: bytes) -> bool:
        self.events += 1
        self.tap.feed(event)
        return True

    def outcome(self) -> Outcome:
        o = self.tap.outcome
        return Outcome(o.usage, o.response_id, response=o.response)

    @property
    def finished(self) -> bool:
        return self.tap.finished

    def error_event(self, message: str) -> bytes:
        body = {"type": "error", "code": "stream_interrupted", "message": message, "param": None,
                "sequence_number": self.events}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


class UpstreamProtocol(ABC):
    """One OpenAI API as the gateway forwards it. Stateless: one instance per path serves every request."""

    def __init__(self, name: str) -> None:
        self.name = name  # the path it is forwarded to, relative to a backend's base URL

    @abstractmethod
    def reader(self, *, client_wants_usage: bool) -> ChatReader | ResponsesReader:
        """A reader for one relayed stream (``router.upstream.StreamReader``)."""

    def upstream_body(self, body: Mapping[str, Any], model: str, *, stream: bool, client_wants_usage: bool
                      ) -> dict[str, Any]:
        """What to send the backend serving ``model``: the client's body with its model replaced."""
        return dict(body, model=model)

    def outcome_of_body(self, content: bytes) -> Outcome:
        """What a JSON answer (HTTP 200) says: usage and its id."""
        found = _usage_and_id(content)
        if found is None:
            return Outcome(ok=True)
        usage, completion_id, _ = found
        return Outcome(usage, completion_id, ok=True)


class ChatProtocol(UpstreamProtocol):
    """Chat completions (``chat/completions``) and text completions (``completions``): usage asked for on
    streams whose client did not ask, and its report hidden from them."""

    def reader(self, *, client_wants_usage: bool) -> ChatReader:
        return ChatReader(drop_usage_event=not client_wants_usage)

    def upstream_body(self, body: Mapping[str, Any], model: str, *, stream: bool, client_wants_usage: bool
                      ) -> dict[str, Any]:
        forward = dict(body, model=model)
        if stream and not client_wants_usage:
            forward["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return forward


class ResponsesProtocol(UpstreamProtocol):
    """The Responses API (``responses``): the body goes as it is (usage always comes in the response)."""

    def reader(self, *, client_wants_usage: bool) -> ResponsesReader:
        return ResponsesReader()

    def outcome_of_body(self, content: bytes) -> Outcome:
        o = outcome_of_responses_body(content)
        return Outcome(o.usage, o.response_id, ok=True, response=o.response)


PROTOCOLS: dict[str, type[UpstreamProtocol]] = {
    "chat/completions": ChatProtocol,
    "completions": ChatProtocol,
    "responses": ResponsesProtocol,
}
"""Each forwarded path's protocol; instantiate one per path (``PROTOCOLS[path](path)``)."""
