"""What the scorer reads of a conversation (``PromptEncoder.view``, ``scorer.conversation``), and that every valid
OpenAI chat message shape is read without an error: content parts of every kind, null content with tool calls,
names, refusals, developer/tool/function roles (hypothesis generates them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from router.affinity import session_of
from router.config import ScorerConfig
from router.responses import messages_of
from router.scorer.prompt import CONVERSATION_VIEWS, PromptEncoder
from router.scorer.recipe import message_text, normalise_messages
from router.text_features import prompt_text

MAX_TOKENS = 64

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
image_part = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
    {"url": st.sampled_from(["https://example.com/a.png", "data:image/png;base64,iVBORw0KGgo="])},
    optional={"detail": st.sampled_from(["auto", "low", "high"])})})
audio_part = st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.fixed_dictionaries(
    {"data": st.just("UklGRg=="), "format": st.sampled_from(["wav", "mp3"])})})
file_part = st.fixed_dictionaries({"type": st.just("file"), "file": st.fixed_dictionaries(
    {}, optional={"file_id": st.just("file-1"), "filename": text, "file_data": st.just("JVBERi0=")})})
refusal_part = st.fixed_dictionaries({"type": st.just("refusal"), "refusal": text})
user_content = st.one_of(text, st.lists(st.one_of(text_part, image_part, audio_part, file_part), max_size=4))
tool_call = st.fixed_dictionaries({"id": st.text(min_size=1, max_size=8), "type": st.just("function"),
                                   "function": st.fixed_dictionaries({"name": st.text(min_size=1, max_size=10),
                                                                      "arguments": text})})
name = {"name": st.text(min_size=1, max_size=10)}

system = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer"]),
                                "content": st.one_of(text, st.lists(text_part, max_size=3))}, optional=name)
user = st.fixed_dictionaries({"role": st.just("user"), "content": user_content}, optional=name)
assistant = st.one_of(
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.one_of(text, st.lists(
        st.one_of(text_part, refusal_part), max_size=3))}, optional={**name, "refusal": st.none() | text}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(),
                           "tool_calls": st.lists(tool_call, min_size=1, max_size=3)},
                          optional={"refusal": st.none()}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(), "refusal": text}),
)
tool = st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": st.text(min_size=1, max_size=8),
                              "content": st.one_of(text, st.lists(text_part, max_size=3))})
function = st.fixed_dictionaries({"role": st.just("function"), "name": st.text(min_size=1, max_size=10),
                                  "content": st.none() | text})
message = st.one_of(system, user, assistant, tool, function)
conversation = st.lists(message, min_size=1, max_size=8)


@pytest.fixture(scope="module")
def encoders(tiny_scorer_cfg: ScorerConfig) -> dict[str, PromptEncoder]:
    folder = Path(str(tiny_scorer_cfg.model))
    return {"whole": PromptEncoder(folder, MAX_TOKENS),
            "last_turn": PromptEncoder(folder, MAX_TOKENS, conversation="last_turn"),
            "last_turn_with_context": PromptEncoder(folder, MAX_TOKENS, conversation="last_turn_with_context",
                                                    context_tokens=8)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversation)
def test_every_valid_message_shape_is_read_without_error(encoders: dict[str, PromptEncoder],
                                                         messages: list[dict[str, Any]]) -> None:
    normal = normalise_messages(messages)
    assert all(isinstance(m["content"], str) and isinstance(m["role"], str) for m in normal)
    assert all(m["role"] != "developer" for m in normal)
    assert isinstance(prompt_text(messages), str)
    for encoder in encoders.values():
        ids = encoder.encode(messages)
        assert 0 < len(ids) <= MAX_TOKENS
        assert isinstance(prompt_text(encoder.view(messages)), str)
    session_of(Headers(), {}, messages)
    messages_of([{"type": "message", **m} if m["role"] in ("user", "assistant", "system", "developer") else m
                 for m in messages])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.lists(system, max_size=2), question=user)
def test_a_single_question_reads_the_same_in_every_view(encoders: dict[str, PromptEncoder],
                                                        head: list[dict[str, Any]], question: dict[str, Any]) -> None:
    messages = [*head, question]
    rendered = {name: e.render(messages) for name, e in encoders.items()}
    assert len(set(rendered.values())) == 1
    assert {tuple(e.encode(messages)) for e in encoders.values()} == {tuple(encoders["whole"].encode(messages))}


def test_parts_and_refusals_read_as_their_text() -> None:
    assert message_text([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}},
                         {"type": "refusal", "refusal": "no"}, "b", 7]) == "a\nno\nb"
    assert message_text(None) == "" and message_text({"odd": 1}) == "{'odd': 1}"
    normal = normalise_messages([{"role": "assistant", "content": None, "refusal": "I can't."},
                                 {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
                                 {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}])
    assert normal == [{"role": "assistant", "content": "I can't."}, {"role": "assistant", "content": ""},
                      {"role": "system", "content": "Be brief."}]


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Janet's ducks lay 16 eggs per day."},
    {"role": "assistant", "content": "She eats three for breakfast every morning."},
    {"role": "user", "content": "How many bolts in total?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                           "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c", "content": "The quick brown fox"},
]


def test_whole_reads_everything(encoders: dict[str, PromptEncoder]) -> None:
    assert encoders["whole"].view(CONVERSATION) == normalise_messages(CONVERSATION)


def test_last_turn_reads_the_opening_system_messages_and_the_last_user_message(
        encoders: dict[str, PromptEncoder]) -> None:
    assert encoders["last_turn"].view(CONVERSATION) == [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "How many bolts in total?"}]


def test_last_turn_with_context_reads_the_end_of_the_turns_before_within_its_budget(
        encoders: dict[str, PromptEncoder]) -> None:
    encoder = encoders["last_turn_with_context"]
    view = encoder.view(CONVERSATION)
    assert view[0] == CONVERSATION[0] and view[-1] == {"role": "user", "content": "How many bolts in total?"}
    context = view[1:-1]
    assert context and context[-1]["role"] == "assistant"
    assert CONVERSATION[2]["content"].endswith(context[-1]["content"])  # the end of the latest turn is kept
    used = sum(len(encoder.tokenizer.encode(m["content"], add_special_tokens=False).ids) for m in context)
    assert used <= encoder.context_tokens + len(context)  # a cut message may re-tokenise one token longer


def test_a_conversation_without_a_user_message_is_read_whole(encoders: dict[str, PromptEncoder]) -> None:
    only = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hello"}]
    for encoder in encoders.values():
        assert encoder.view(only) == normalise_messages(only)


def test_a_huge_earlier_turn_is_cut_before_it_is_tokenised(encoders: dict[str, PromptEncoder]) -> None:
    encoder = encoders["last_turn_with_context"]
    huge = [{"role": "user", "content": "eggs " * 200_000}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "and?"}]
    view = encoder.view(huge)
    assert len(view[0]["content"]) <= encoder.context_tokens * encoder.max_token_chars
    assert view[-1]["content"] == "and?"


def test_unknown_views_are_refused(encoders: dict[str, PromptEncoder]) -> None:
    assert set(CONVERSATION_VIEWS) == set(encoders)
    with pytest.raises(ValueError, match="conversation"):
        PromptEncoder(Path("."), 8, conversation="middle")


def test_the_default_reads_the_last_turn_with_context() -> None:
    cfg = ScorerConfig()
    assert (cfg.conversation, cfg.context_tokens) == ("last_turn_with_context", 256)
