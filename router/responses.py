"""OpenAI's Responses API (``POST /v1/responses``), the parts the gateway reads. Pure: no HTTP, no store.

A Responses request is routed like a chat: its input (a string, or a list of items: messages with
``input_text``/``output_text`` parts, ``function_call`` and ``function_call_output`` items, reasoning items…)
and its ``instructions`` become the chat-style messages the scorer reads (``messages_of``).

``previous_response_id`` is served by the gateway, not by a backend: vLLM keeps responses only with
``VLLM_ENABLE_RESPONSES_API_STORE=1``, in its own process memory, never freed, so a follow-up would have to go to
the replica-less backend that stored it and would be lost with a restart of it. Instead the gateway records, for
each response it relays, the conversation's full item list (every input item, expanded, followed by the
response's output items: ``conversation_after``) in a shared store with a TTL, and turns a follow-up into one
self-contained request (``prepare``): the stored items, then the new input, with no ``previous_response_id`` and
``store: false``. Any backend can answer it, so routing stays free, and no backend keeps anything. As in OpenAI's
API, the previous response's ``instructions`` are not carried over: each request's own apply.

Usage arrives in the JSON body's ``usage`` or, streamed, in the terminal event (``response.completed``, or
``response.incomplete`` / ``response.failed``): ``ResponsesTap`` reads it while the relay passes the bytes on.
The stream a vLLM server sends (0.32, recorded in tests/unit/recorded/responses_stream.sse) is
``response.created``, ``response.in_progress``, then per output item ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``…, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done`` (function calls: ``output_item.added``,
``response.function_call_arguments.delta``…, ``…arguments.done``, ``output_item.done``), and last
``response.completed`` carrying the whole response with ``usage`` (also when it stopped at ``max_output_tokens``:
``status: "incomplete"``); no ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from router.errors import InvalidRequest, NotFound
from router.scorer.recipe import message_text
from router.upstream import Usage

__all__ = [
    "TERMINAL_EVENTS",
    "ResponsesCall",
    "ResponsesOutcome",
    "ResponsesRequest",
    "ResponsesTap",
    "conversation_after",
    "input_items",
    "messages_of",
    "outcome_of_response",
    "outcome_of_responses_body",
    "prepare",
    "previous_not_found",
]

TERMINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
_READ_PARTS = (*TEXT_PARTS, "refusal")


class ResponsesRequest(BaseModel):
    """The fields of a Responses request the gateway reads; every other field passes through untouched."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, examples=["router"])
    input: str | list[Any] | None = Field(None, examples=["What is 17*23?"])
    instructions: str | None = None
    tools: list[Any] | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=200)
    stream: bool = False
    store: bool = True
    background: bool = False
    max_output_tokens: int | None = Field(None, ge=1)

    def check(self) -> None:
        """Refuse what the gateway cannot serve (InvalidRequest: a 400 in OpenAI's error format)."""
        if self.input is None and self.previous_response_id is None:
            raise InvalidRequest("input: required (a string or a list of input items)", param="input",
                                 code="missing_required_parameter")
        if isinstance(self.input, str) and not self.input and self.previous_response_id is None:
            raise InvalidRequest("input: must not be empty", param="input", code="invalid_value")
        if self.background:
            raise InvalidRequest("background: responses run in the background are not supported by this gateway; "
                                 "send the request without background (streaming works)", param="background",
                                 code="unsupported_parameter")
        if self.model_extra and self.model_extra.get("conversation") is not None:
            raise InvalidRequest("conversation: the Conversations API is not supported by this gateway; chain "
                                 "responses with previous_response_id instead", param="conversation",
                                 code="unsupported_parameter")
        if isinstance(self.input, list):
            for i, item in enumerate(self.input):
                if not isinstance(item, Mapping):
                    raise InvalidRequest(f"input[{i}]: an input item must be an object", param=f"input[{i}]",
                                         code="invalid_value")


def previous_not_found(response_id: str) -> NotFound:
    """The error for a ``previous_response_id`` the store does not hold (unknown, expired, or another key's)."""
    return NotFound(f"Previous response with id '{response_id}' not found.", param="previous_response_id",
                    code="previous_response_not_found")


def input_items(value: str | Sequence[Any] | None) -> list[dict[str, Any]]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return [dict(item) for item in value]


def _parts_text(content: Any) -> str:
    """The text of a message's content or a tool output: a string, or the text of its text and refusal parts as
    the scorer reads a chat message's (``message_text``); a part of another type (an image, a file, audio) has
    none, whatever it holds."""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        return ""
    return message_text([p for p in content if not isinstance(p, Mapping) or p.get("type", "text") in _READ_PARTS])


def _call(item: Mapping[str, Any]) -> dict[str, Any]:
    """A function (or custom tool) call item as a chat assistant message with one tool call."""
    arguments = item.get("arguments", item.get("input", ""))
    name = item.get("name")
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": str(item.get("call_id") or item.get("id") or ""), "type": "function",
        "function": {"name": name if isinstance(name, str) else "",
                     "arguments": arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()}}]}


def messages_of(items: Sequence[Mapping[str, Any]], instructions: str | None = None) -> list[dict[str, Any]]:
    """Input items (and instructions) → chat-style messages, what the scorer and the session key read.

    Messages keep their role (``developer`` stays: the scorer reads it as system); a function call becomes an
    assistant message with ``tool_calls``, its output a ``tool`` message; consecutive calls join one assistant
    message, as chat clients send them. Reasoning items (the model's own thoughts, which a chat conversation does
    not carry), item references and hosted tools' items (web search, file search, computer…) are left out."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item.get("type")
        if kind in (None, "message") and isinstance(item.get("role"), str):
            messages.append({"role": item["role"], "content": _parts_text(item.get("content"))})
        elif kind in ("function_call", "custom_tool_call"):
            call = _call(item)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].extend(call["tool_calls"])
            else:
                messages.append(call)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                             "content": _parts_text(item.get("output"))})
    return messages


@dataclass(frozen=True)
class ResponsesCall:
    """One Responses request made self-contained."""

    body: dict[str, Any]  # what to forward (its ``model`` still to be replaced by the backend's)
    items: list[dict[str, Any]]  # the whole conversation's input: the stored items, then this request's
    messages: list[dict[str, Any]]  # what the scorer reads (``messages_of(items, instructions)``)
    store: bool  # whether to record the conversation under the response's id afterwards (the client's store)


def prepare(body: Mapping[str, Any], request: ResponsesRequest, stored: Sequence[Mapping[str, Any]] | None
            ) -> ResponsesCall:
    """The self-contained request for ``body``: ``stored`` (the items recorded for its ``previous_response_id``;
    None when it has none) followed by its own input, forwarded with ``store: false`` and without
    ``previous_response_id``. Call ``request.check()`` first; a previous id the store lacks is
    ``previous_not_found``."""
    items = [*(dict(i) for i in stored or ()), *input_items(request.input)]
    forward = dict(body)
    forward.pop("previous_response_id", None)
    forward["input"] = items
    forward["store"] = False
    return ResponsesCall(forward, items, messages_of(items, request.instructions), request.store)


def conversation_after(call: ResponsesCall, response: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What to record under ``response["id"]``: the call's items and the response's output items, so a request
    naming it as ``previous_response_id`` continues the whole conversation."""
    output = response.get("output")
    return [*call.items, *(dict(o) for o in output if isinstance(o, Mapping))] if isinstance(output, list) \
        else list(call.items)


@dataclass
class ResponsesOutcome:
    """What the gateway learns from one Responses answer."""

    usage: Usage | None = None
    response_id: str | None = None
    status: str | None = None  # completed, incomplete, failed, …
    response: dict[str, Any] | None = field(default=None, repr=False)  # the final response object


def _usage(usage: Any) -> Usage | None:
    if not isinstance(usage, Mapping):
        return None
    return Usage(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0))


def outcome_of_response(doc: Any) -> ResponsesOutcome:
    """The outcome of a response object (a JSON answer's body, or the ``response`` of a terminal event)."""
    if not isinstance(doc, Mapping):
        return ResponsesOutcome()
    rid = doc.get("id") if isinstance(doc.get("id"), str) else None
    status = doc.get("status") if isinstance(doc.get("status"), str) else None
    return ResponsesOutcome(_usage(doc.get("usage")), rid, status, dict(doc))


def outcome_of_responses_body(content: bytes) -> ResponsesOutcome:
    """The outcome of a non-streamed answer's body (an error body or non-JSON gives an empty outcome)."""
    try:
        return outcome_of_response(orjson.loads(content))
    except orjson.JSONDecodeError:
        return ResponsesOutcome()


class ResponsesTap:
    """Reads a relayed Responses stream event by event (``feed`` each complete SSE event, without its blank
    line), keeping the response id from ``response.created`` and the final response, with its usage, from the
    terminal event. It parses only those events; the others are passed over by a substring test."""

    def __init__(self) -> None:
        self.outcome = ResponsesOutcome()

    def feed(self, event: bytes) -> None:
        if b"response.created" not in event and not any(t.encode() in event for t in TERMINAL_EVENTS):
            return
        data = b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, Mapping):
            return
        kind = doc.get("type")
        if kind == "response.created" and isinstance(doc.get("response"), Mapping):
            self.outcome.response_id = self.outcome.response_id or doc["response"].get("id")
        elif kind in TERMINAL_EVENTS:
            self.outcome = outcome_of_response(doc.get("response"))

    @property
    def finished(self) -> bool:
        """Whether the terminal event has been seen."""
        return self.outcome.response is not None
