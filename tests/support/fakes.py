"""Small stand-ins for unit tests of routing: a prompt encoder as routing uses it."""

from __future__ import annotations

from collections.abc import Sequence

from router.scorer.recipe import Message, normalise_messages


class ViewEncoder:
    """The scorer's PromptEncoder as routing uses it: the conversation view (every message, normalised) and token
    ids (one per character, enough to key a cache)."""

    def view(self, messages: Sequence[Message]) -> list[dict[str, str]]:
        return normalise_messages(messages)

    async def encode_async(self, messages: Sequence[Message]) -> list[int]:
        return [ord(c) for m in normalise_messages(messages) for c in m["content"]]
