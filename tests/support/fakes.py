"""Small stand-ins for unit tests: a clock set by hand, a prompt encoder as routing uses it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.scorer.recipe import Message, normalise_messages


@dataclass
class Clock:
    """A clock to inject, moved by hand (``clock.now += 60``)."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class ViewEncoder:
    """The scorer's PromptEncoder as routing uses it: the conversation view (every message, normalised) and token
    ids (one per character, enough to key a cache)."""

    def view(self, messages: Sequence[Message]) -> list[dict[str, str]]:
        return normalise_messages(messages)

    async def encode_async(self, messages: Sequence[Message]) -> list[int]:
        return [ord(c) for m in normalise_messages(messages) for c in m["content"]]
