"""The demo's stand-in, a real vLLM CPU server started as the demo starts it (scripts/vllm_cpu.py, standin_args),
serves tool calling and the Responses API: chats with tools and tool-result turns are answered (no 400), calls
are parsed into ``tool_calls``, and /v1/responses answers plain, streamed, with function calls and with a
conversation sent whole, which is what the gateway sends for a ``previous_response_id`` (the stand-in itself keeps
no responses: it answers a follow-up by id with 404)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from router.config import load_settings
from router.responses import ResponsesTap
from router.scorer.source import resolve_model
from scripts.vllm_cpu import VllmServer, standin_args, start_vllm, wait_ready
from tests.conftest import ROOT
from tests.support.servers import free_port

CHAT_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
RESPONSES_TOOLS = [{"type": "function", **CHAT_TOOLS[0]["function"]}]
QUESTION = {"role": "user", "content": "What is the weather in Paris? Use the tool."}


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    settings = load_settings(ROOT / "config.yaml")
    model_dir = resolve_model(settings.scorer.model, settings.scorer.cache_dir).path
    server = start_vllm(model_dir, free_port(), ["standin"], core=0, extra_args=standin_args(),
                        log_path=tmp_path_factory.mktemp("standin") / "vllm.log")
    try:
        wait_ready([server], timeout_s=600)
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(standin: VllmServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=standin.base_url, api_key="unused", max_retries=0, timeout=120)


def test_a_chat_with_tools_and_auto_tool_choice_is_answered(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="standin", messages=[QUESTION], tools=CHAT_TOOLS,
                                            tool_choice="auto", max_tokens=24, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    plain = client.chat.completions.create(model="standin", messages=[QUESTION], max_tokens=1)
    assert answer.usage is not None and plain.usage is not None
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools are in the prompt


def test_a_required_call_is_parsed_into_tool_calls(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="standin", messages=[QUESTION], tools=CHAT_TOOLS,
                                            tool_choice="required", max_tokens=150, temperature=0)
    calls = answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "tool_calls" and calls
    assert calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)


def test_a_tool_result_turn_is_answered_streamed_and_not(client: openai.OpenAI) -> None:
    messages = [QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18, "sky": "cloudy"}'}]
    answer = client.chat.completions.create(model="standin", messages=messages, tools=CHAT_TOOLS,
                                            max_tokens=24, temperature=0)
    assert answer.choices[0].message.content is not None or answer.choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(model="standin", messages=messages, tools=CHAT_TOOLS,
                                                 max_tokens=8, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason is not None


def test_responses_plain_and_streamed(client: openai.OpenAI, standin: VllmServer) -> None:
    answer = client.responses.create(model="standin", input="What is 2+2?", instructions="Answer briefly.",
                                     max_output_tokens=16, temperature=0)
    assert answer.output_text and answer.usage is not None and answer.usage.input_tokens > 0
    with httpx.stream("POST", f"{standin.base_url}/responses", timeout=120, json={
            "model": "standin", "input": "What is 2+2?", "max_output_tokens": 6, "stream": True}) as r:
        body = r.read()
    events = [e for e in body.split(b"\n\n") if e.strip()]
    names = [e.split(b"\n")[0].removeprefix(b"event: ").decode() for e in events]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert "response.output_text.delta" in names and names[-1] == "response.completed"
    tap = ResponsesTap()
    for event in events:
        tap.feed(event)
    assert tap.finished and tap.outcome.usage is not None and tap.outcome.usage.completion_tokens == 6


def test_responses_function_calls_and_a_whole_conversation_sent_as_input(client: openai.OpenAI) -> None:
    called = client.responses.create(model="standin", input="Weather in Paris? use the tool", tools=RESPONSES_TOOLS,
                                     tool_choice="required", max_output_tokens=80, temperature=0)
    calls = [o for o in called.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    items = [{"role": "user", "content": "Weather in Paris? use the tool"},
             *(o.model_dump(exclude_none=True) for o in called.output),
             {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp_c": 18}'},
             {"role": "user", "content": [{"type": "input_text", "text": "Thanks. And tomorrow?"}]}]
    answer = client.responses.create(model="standin", input=items, tools=RESPONSES_TOOLS, max_output_tokens=12,
                                     temperature=0, store=False)
    assert answer.status in ("completed", "incomplete") and answer.usage is not None


def test_a_repeated_prefix_is_served_from_the_prefix_cache_and_reported(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You are a patient tutor. " * 40}, QUESTION]
    client.chat.completions.create(model="standin", messages=messages, max_tokens=1)
    again = client.chat.completions.create(model="standin", messages=messages, max_tokens=1)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens  # what keeping a conversation on one backend saves


def test_the_standin_keeps_no_responses(client: openai.OpenAI) -> None:
    first = client.responses.create(model="standin", input="What is 2+2?", max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="standin", input="And times 3?", previous_response_id=first.id,
                                max_output_tokens=4)


def test_the_template_renders_what_smollm2_renders_without_tools() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    settings = load_settings(ROOT / "config.yaml")
    own = (resolve_model(settings.scorer.model, settings.scorer.cache_dir).path / "chat_template.jinja").read_text()
    ours = Path(standin_args()[1]).read_text()
    for messages in ([QUESTION], [{"role": "system", "content": "Be brief."}, QUESTION,
                                  {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Sure?"}]):
        for generation_prompt in (True, False):
            rendered = [render_jinja_template(conversations=[messages], chat_template=t,
                                              add_generation_prompt=generation_prompt)[0][0] for t in (own, ours)]
            assert rendered[0] == rendered[1]
