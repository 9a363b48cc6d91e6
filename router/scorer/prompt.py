"""Messages → the token ids the scorer reads: the model's chat template with the generation prompt, tokenised,
the start cut off if longer than ``max_prompt_tokens`` (the end holds the question and the turn). A huge prompt
is cut before it is rendered, so its sender cannot make the gateway render and tokenise megabytes.

Torch-free (jinja2 through transformers' template renderer, and the ``tokenizers`` library), so a gateway whose
scorer is a remote server renders and tokenises exactly as the in-process one does, and sends token ids.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from router.scorer.recipe import Message, normalise_messages

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Messages longer than this (characters, or messages) are rendered and tokenised on a worker thread by
# ``encode_async``: a prompt of megabytes takes tens of milliseconds (the event loop would stall for them), a
# question some hundreds of microseconds (less than the hop to a thread and back)
OFF_LOOP_CHARS = 32_768
OFF_LOOP_MESSAGES = 64
CONVERSATION_VIEWS = ("whole", "last_turn", "last_turn_with_context")


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _content_chars(messages: Sequence[Message], enough: int) -> int:
    """The characters of the messages' text content, counted without copying anything; the count stops once it
    passes ``enough``."""
    total = 0
    for m in messages:
        content = m.get("content")
        for part in [content] if isinstance(content, str) else content if isinstance(content, list) else []:
            text = part.get("text") if isinstance(part, Mapping) else part
            if isinstance(text, str):
                total += len(text)
        if total > enough:
            break
    return total


class PromptEncoder:
    """A model folder's chat template and tokenizer."""

    def __init__(self, folder: Path, max_prompt_tokens: int, *, conversation: str = "whole",
                 context_tokens: int = 0) -> None:
        if conversation not in CONVERSATION_VIEWS:
            raise ValueError(f"conversation {conversation!r}: one of {', '.join(CONVERSATION_VIEWS)}")
        folder = Path(folder)
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if not isinstance(template, str):
            raise ValueError(f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json)")
        self.template: str = template
        self.special_tokens = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_prompt_tokens = max_prompt_tokens
        self.conversation = conversation
        self.context_tokens = context_tokens
        # the most characters one token can stand for (byte-level vocabularies spell a byte as one character)
        self.max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())
        eos = self.special_tokens.get("eos_token")
        self.pad_id = (self.tokenizer.token_to_id(self.special_tokens.get("pad_token") or eos or "") or 0)

    def view(self, messages: Sequence[Message]) -> list[dict[str, str]]:
        """The part of a conversation the scorer reads (``scorer.conversation``), as normalised messages; the text
        features of a probe read the same (``router.text_features.prompt_text`` of this).

        The conversation is split into its head (the system and developer messages it opens with), its last user
        message (the question now asked), what came before that message, and what follows it (the assistant's
        tool calls and their results, in an agent's loop). ``whole`` keeps everything; ``last_turn`` the head and
        the last user message; ``last_turn_with_context`` also the end of what came before, up to
        ``context_tokens`` tokens of text. What follows the last user message is read only by ``whole``. A
        conversation without a user message after its head is read whole. A single-turn prompt (a head and one user
        message) reads the same in every view, so the view is not part of the feature recipe: probes trained on
        single questions hold for every view.

        Why ``last_turn_with_context`` (256 tokens) is the default: on labelled GSM8K questions asked as the last
        turn of built conversations (research/conversations/README.md), the shipped probes' AUROC stayed within
        noise of the question asked alone for every kind of conversation only with it. ``last_turn`` lost 0.13
        on follow-ups whose last message needs the turns before it ("how many pages should she read?"), ``whole``
        lost up to 0.10 when an agent's tool result followed the question (the result, not the question, ends
        the prompt), and a probe reads what ends the prompt. Rendering the request's tool definitions added
        nothing. It also gives the forward pass fewer tokens than the whole conversation (there: 352 against 470 on
        chats, 391 against 859 with tool results), for about the same rendering and tokenising time.
        """
        normal = normalise_messages(messages)
        if self.conversation == "whole":
            return normal
        start = 0
        while start < len(normal) and normal[start]["role"] == "system":
            start += 1
        last = next((i for i in range(len(normal) - 1, start - 1, -1) if normal[i]["role"] == "user"), None)
        if last is None:
            return normal
        context: list[dict[str, str]] = []
        if self.conversation == "last_turn_with_context":
            context = self._context(normal[start:last])
        return [*normal[:start], *context, normal[last]]

    def _context(self, before: list[dict[str, str]]) -> list[dict[str, str]]:
        """The end of ``before``: whole messages, latest first, while their text fits ``context_tokens`` tokens,
        and the end of the one that does not fit, cut to what is left."""
        left = self.context_tokens
        kept: list[dict[str, str]] = []
        for m in reversed(before):
            if left <= 0:
                break
            text, ids = self._tail(m["content"], left)
            left -= len(ids)
            kept.append({"role": m["role"], "content": text})
        return kept[::-1]

    def _tail(self, text: str, n: int) -> tuple[str, list[int]]:
        """The end of ``text`` that is its last ``n`` tokens at most (and those tokens). Only an end of the text is
        tokenised: 8 characters a token at first (English runs at about 4), more only when that held too few tokens,
        never more than ``n`` tokens can cover; the tokens kept lie a few words away from where the end was cut,
        where the cut cannot change how they are split."""
        bound = 8 * n
        while True:
            piece = text[-bound:]
            ids = self.tokenizer.encode(piece, add_special_tokens=False).ids
            whole = len(piece) == len(text)
            if whole or len(ids) > n + 4 or bound >= n * self.max_token_chars:
                break
            bound = min(4 * bound, n * self.max_token_chars)
        if whole and len(ids) <= n:
            return text, ids
        return self.tokenizer.decode(ids[-n:]), ids[-n:]

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt exactly as the scorer reads it: the chat template with the generation prompt."""
        rendered, _ = render_jinja_template(
            conversations=[self._bounded(self.view(messages))], chat_template=self.template,
            add_generation_prompt=True, **self.special_tokens)
        return rendered[0]

    def _bounded(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages cut, keeping their end, to what can still reach the last ``max_prompt_tokens`` tokens. Each
        message renders to at least one token and each token covers at most ``max_token_chars`` characters, so a
        prompt within the limit is never cut (its features stay exactly what they were), and a longer one keeps
        more than the tokens it is scored on."""
        limit = self.max_prompt_tokens
        if len(messages) > limit:
            messages = messages[-limit:]
        budget = limit * self.max_token_chars
        if sum(len(m["content"]) for m in messages) <= budget:
            return messages
        kept = []
        for m in reversed(messages):
            text = m["content"][len(m["content"]) - budget:] if budget > 0 else ""
            budget -= len(text)
            kept.append({"role": m["role"], "content": text})
        return kept[::-1]

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Rendered prompts → token ids, each cut to its last ``max_prompt_tokens``."""
        encoded = self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)
        return [e.ids[-self.max_prompt_tokens:] for e in encoded]

    def encode(self, messages: Sequence[Message]) -> list[int]:
        return self.encode_prompts([self.render(messages)])[0]

    async def encode_async(self, messages: Sequence[Message]) -> list[int]:
        """``encode`` for the event loop: long messages on a worker thread, short ones at once."""
        if len(messages) > OFF_LOOP_MESSAGES or _content_chars(messages, OFF_LOOP_CHARS) > OFF_LOOP_CHARS:
            return await asyncio.to_thread(self.encode, messages)
        return self.encode(messages)

    def min_tokens(self, messages: Sequence[Message]) -> int:
        """A lower bound on the tokens ``encode(messages)`` gives, found without rendering: each message renders
        to one token at least, and a token covers ``max_token_chars`` characters at most (a scorer's queue can
        refuse a request by it before tokenising it)."""
        enough = self.max_prompt_tokens * self.max_token_chars
        chars = _content_chars(messages, enough)
        return max(1, min(self.max_prompt_tokens, max(len(messages), -(-chars // self.max_token_chars))))

    def shared_prefix(self) -> list[int]:
        """The token ids that every one-message conversation starts with (the template's opening, and its default
        system prompt if it has one), less the last, which a tokenizer may merge with the text that follows."""
        a, b = (self.encode([{"role": "user", "content": text}]) for text in ("1", "Why?"))
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        return a[:max(common - 1, 0)]
