"""The Responses API core: requests made self-contained, what the scorer reads of them, and the outcome of real
answers (bodies and streams recorded from a vLLM 0.32 CPU server running the demo's stand-in, see
tests/unit/recorded/README.md)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from router.errors import InvalidRequest, NotFound
from router.http import status_of
from router.responses import (
    ResponsesRequest,
    ResponsesTap,
    conversation_after,
    input_items,
    messages_of,
    outcome_of_responses_body,
    prepare,
    previous_not_found,
)
from router.schemas import parse_body
from router.scorer.recipe import normalise_messages

RECORDED = Path(__file__).parent / "recorded"


def parsed(body: dict) -> tuple[dict, ResponsesRequest]:
    raw, request = parse_body(orjson.dumps(body), ResponsesRequest)
    request.check()
    return raw, request


def events(name: str) -> list[bytes]:
    return [e for e in (RECORDED / name).read_bytes().split(b"\n\n") if e.strip()]


def test_a_string_input_is_one_user_message_after_the_instructions() -> None:
    _, request = parsed({"model": "router", "input": "What is 17*23?", "instructions": "Be brief."})
    call = prepare({"model": "router", "input": "What is 17*23?"}, request, None)
    assert call.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17*23?"}]
    assert call.items == [{"type": "message", "role": "user", "content": "What is 17*23?"}]
    assert call.body["input"] == call.items and call.body["store"] is False and call.store


def test_items_become_chat_messages() -> None:
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in"},
                                                         {"type": "input_image", "image_url": "https://x/y.png"},
                                                         {"type": "input_text", "text": "Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "I should call it"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": '{"temp_c": 18}'},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "18 C at noon",
                                                              "annotations": []},
                                                             {"type": "refusal", "refusal": "no more"}]},
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        {"type": "item_reference", "id": "msg_1"},
    ]
    messages = messages_of(items)
    assert messages == [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in\nParis?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 18}'},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
        {"role": "assistant", "content": "18 C at noon\nno more"},
    ]
    assert normalise_messages(messages)[0]["role"] == "system"  # the scorer reads developer as system


def test_custom_tool_calls_and_odd_values_do_not_break_the_reading() -> None:
    items = [{"type": "custom_tool_call", "call_id": "k", "name": "grep", "input": "needle"},
             {"type": "custom_tool_call_output", "call_id": "k", "output": None},
             {"type": "function_call", "name": 7, "arguments": {"a": 1}},
             {"type": "message", "role": "user", "content": 12}]
    messages = messages_of(items)
    assert messages[0]["tool_calls"][0]["function"] == {"name": "grep", "arguments": "needle"}
    assert messages[1] == {"role": "tool", "tool_call_id": "k", "content": ""}
    assert messages[2]["tool_calls"][0]["function"] == {"name": "", "arguments": '{"a":1}'}
    assert messages[3] == {"role": "user", "content": ""}


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "router"}, "input"),
    ({"model": "router", "input": ""}, "input"),
    ({"model": "router", "input": "hi", "background": True}, "background"),
    ({"model": "router", "input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"model": "router", "input": ["hi"]}, "input[0]"),
])
def test_requests_the_gateway_cannot_serve_get_a_400(body: dict, param: str) -> None:
    _, request = parse_body(orjson.dumps(body), ResponsesRequest)
    with pytest.raises(InvalidRequest) as e:
        request.check()
    assert status_of(e.value) == 400 and e.value.param == param


@pytest.mark.parametrize("body", [
    {"model": "router", "input": 5},
    {"model": "", "input": "hi"},
    {"model": "router", "input": "hi", "max_output_tokens": 0},
    {"model": "router", "input": "hi", "previous_response_id": ""},
])
def test_malformed_requests_get_a_400_from_validation(body: dict) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_body(orjson.dumps(body), ResponsesRequest)
    assert status_of(e.value) == 400


def test_a_follow_up_alone_needs_no_input_and_unknown_ids_are_a_404() -> None:
    parsed({"model": "router", "previous_response_id": "resp_1"})
    error = previous_not_found("resp_1")
    assert isinstance(error, NotFound) and status_of(error) == 404
    assert error.param == "previous_response_id" and "resp_1" in str(error)


def test_a_follow_up_is_expanded_into_one_self_contained_request() -> None:
    first_body, first = parsed({"model": "router", "input": "What is 2+2?", "instructions": "Answer briefly.",
                                "temperature": 0, "metadata": {"k": "v"}})
    first_call = prepare(first_body, first, None)
    answer = orjson.loads((RECORDED / "responses_plain.json").read_bytes())
    stored = conversation_after(first_call, answer)
    assert stored == [*first_call.items, *answer["output"]]

    body, follow_up = parsed({"model": "router", "input": [{"role": "user", "content": "And times 3?"}],
                              "previous_response_id": answer["id"], "store": False, "user": "u1"})
    call = prepare(body, follow_up, stored)
    assert "previous_response_id" not in call.body
    assert call.body["store"] is False and not call.store  # the client asked not to keep this one
    assert call.body["input"] == [*stored, {"role": "user", "content": "And times 3?"}]
    assert call.body["user"] == "u1"  # other fields pass through untouched
    assert "instructions" not in call.body  # the first request's instructions are not carried over
    assert [m["role"] for m in call.messages] == ["user", "assistant", "user"]
    assert call.messages[1]["content"] == answer["output"][0]["content"][0]["text"]
    assert body["previous_response_id"] == answer["id"]  # the parsed body itself is left as it was


def test_conversation_after_a_response_without_output_keeps_the_input() -> None:
    body, request = parsed({"model": "router", "input": "hi"})
    call = prepare(body, request, None)
    assert conversation_after(call, {"id": "resp_x", "status": "failed"}) == call.items


def test_usage_and_id_of_a_json_answer() -> None:
    outcome = outcome_of_responses_body((RECORDED / "responses_plain.json").read_bytes())
    doc = orjson.loads((RECORDED / "responses_plain.json").read_bytes())
    assert outcome.response_id == doc["id"] and outcome.status == "completed"
    assert outcome.usage is not None
    assert (outcome.usage.prompt_tokens, outcome.usage.completion_tokens) == (
        doc["usage"]["input_tokens"], doc["usage"]["output_tokens"])
    assert outcome_of_responses_body(b'{"error": {"message": "x"}}').usage is None
    assert outcome_of_responses_body(b"not json").response_id is None
    assert outcome_of_responses_body(b"[1]").response is None


def test_the_tap_reads_usage_from_the_terminal_event_of_a_real_stream() -> None:
    stream = events("responses_stream.sse")
    names = [e.split(b"\n")[0].removeprefix(b"event: ").decode() for e in stream]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    tap = ResponsesTap()
    for event in stream[:-1]:
        tap.feed(event)
        assert not tap.finished
    assert tap.outcome.response_id is not None and tap.outcome.usage is None
    tap.feed(stream[-1])
    final = orjson.loads(stream[-1].split(b"data: ", 1)[1])["response"]
    assert tap.finished and tap.outcome.response_id == final["id"]
    assert tap.outcome.status == "incomplete"  # it stopped at max_output_tokens: vLLM still sends .completed
    assert tap.outcome.usage is not None and tap.outcome.usage.completion_tokens == final["usage"]["output_tokens"]


def test_the_tap_keeps_a_streamed_function_call_for_the_conversation() -> None:
    tap = ResponsesTap()
    for event in events("responses_function_call_stream.sse"):
        tap.feed(event)
    assert tap.finished and tap.outcome.response is not None
    output = tap.outcome.response["output"]
    assert [o["type"] for o in output] == ["function_call"]
    body, request = parsed({"model": "router", "input": "Weather in Paris? use the tool"})
    items = conversation_after(prepare(body, request, None), tap.outcome.response)
    assert messages_of(items)[-1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_the_tap_ignores_what_only_looks_like_a_terminal_event() -> None:
    tap = ResponsesTap()
    delta = {"type": "response.output_text.delta", "delta": "response.completed"}
    tap.feed(b"event: response.output_text.delta\ndata: " + orjson.dumps(delta))
    tap.feed(b"event: response.completed\ndata: {not json")
    tap.feed(b"event: response.completed\ndata: [1]")
    assert not tap.finished and tap.outcome.usage is None


def test_input_items_copies() -> None:
    original = [{"role": "user", "content": "x"}]
    copied = input_items(original)
    copied[0]["content"] = "y"
    assert original[0]["content"] == "x"
    assert input_items(None) == []
