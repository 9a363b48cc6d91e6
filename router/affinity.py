"""Session affinity: a conversation stays on the backend that answered its first routed turn. Pure: no I/O.

Why: every turn routed afresh moves a conversation between models mid-way (the answer's style changes under the
user) and throws away the prefix cache the first backend built for it. Keeping it costs little accuracy, since a
later turn still leaves the pinned backend when that backend's estimate for it falls clearly below the threshold.

**Which session** (``session_of``): the first of ``affinity.sources`` a request has, in that order by default:

- ``header``: the ``affinity.header`` request header (``x-session-id``), a session the client names itself;
- ``prompt_cache_key``: OpenAI's field for exactly this (requests sharing it share a prefix cache);
- ``user``: the end user the request is for (every conversation of that user, so the first routed turn of
  their first conversation decides for all of them until the pin expires or breaks: cheap users stay cheap and
  users pinned to a dear backend stay dear; leave it out of ``sources`` to route users' conversations apart);
- ``opening``: a digest of the conversation's opening, its leading system/developer messages and its first user
  message (role and text), which every later turn of the same conversation repeats unchanged, and which a
  Responses request expanded from ``previous_response_id`` repeats too. Conversations that open with the same
  words share a session, and so a backend, whose prefix cache they share as well.

The name is scoped by the client key that sent it (``owner``), so one key cannot steer, or learn about, another
key's sessions, and is hashed, so what goes into a store key is short and safe whatever the client sent.

**The rule** (``apply_affinity``), for a routed request (never one that names a backend): with no pin, the fresh
decision stands and pins its backend; with one, the request stays on the pinned backend unless

- the pinned backend is not configured any more (``unknown``), is not up (``unavailable``), or the sending
  key may not use it (``not_allowed``);
- this turn's estimate for it is below ``threshold − break_margin`` (``estimate``): the conversation has turned
  into something the pinned backend is expected to get wrong, and the fresh decision is taken.

A pinned backend with no estimate for this turn (the scorer could not score it) keeps the conversation: being
unscored is no reason to move it. After a break the fresh decision's backend is pinned instead. What is pinned
is the backend that answered (after failover, the one that finally did), with the pin's lifetime renewed on
every turn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from router.policy import Decision, Reason
from router.scorer.recipe import Message, message_text

__all__ = ["SOURCES", "Affinity", "Session", "Verdict", "apply_affinity", "opening_digest", "session_of"]

SOURCES = ("header", "prompt_cache_key", "user", "opening")
MAX_NAME_CHARS = 512  # a longer session name than this is hashed from its first 512 characters


@dataclass(frozen=True)
class Session:
    """One conversation's name in the affinity store."""

    key: str  # hex digest of (owner, source, name): a store key, never the client's raw text
    source: str  # which of SOURCES named it
    lookup: bool  # whether a pin may already exist: always for named sessions; for ``opening`` only on a
    # later turn (a request with one user message and nothing after it is a first turn, which only pins)


def _digest(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()


def _role(m: Message) -> str:
    role = m.get("role")
    return "system" if role == "developer" else str(role or "user")


def opening_digest(messages: Sequence[Message]) -> tuple[str, bool] | None:
    """(a digest of the leading system/developer messages and the first user message, whether the conversation
    goes on past that first user message); None without a user message."""
    parts: list[str] = []
    for i, m in enumerate(messages):
        role = _role(m)
        if role == "system":
            parts += ["system", message_text(m.get("content"))]
            continue
        if role != "user":
            return None  # it opens with an assistant or tool turn: no opening to name it by
        parts += ["user", message_text(m.get("content"))]
        return _digest(*parts), i + 1 < len(messages)
    return None


def session_of(headers: Mapping[str, str], body: Mapping[str, Any], messages: Sequence[Message], *,
               owner: str = "", header: str = "x-session-id", sources: Sequence[str] = SOURCES) -> Session | None:
    """The session a request belongs to, or None when none of ``sources`` names one.

    ``headers``: the request's headers as a case-insensitive mapping (Starlette's ``Headers``); ``body``: the
    parsed JSON body; ``messages``: the conversation as the scorer reads it (for /v1/responses, the expanded
    input); ``owner``: the client key's name (scopes the session)."""
    for source in sources:
        name: Any = None
        if source == "header":
            name = headers.get(header)
        elif source in ("prompt_cache_key", "user"):
            name = body.get(source)
        elif source == "opening":
            found = opening_digest(messages)
            if found is not None:
                digest, later_turn = found
                return Session(_digest(owner, source, digest), source, later_turn)
            continue
        else:
            raise ValueError(f"unknown affinity source {source!r} (known: {', '.join(SOURCES)})")
        if isinstance(name, str) and name.strip():
            return Session(_digest(owner, source, name[:MAX_NAME_CHARS]), source, True)
    return None


class Verdict(StrEnum):
    """What affinity did to one routed request (the ``outcome`` label of ``router_affinity_total``)."""

    NEW = "new"  # no pin: the fresh decision stands and is pinned
    KEPT = "kept"  # the pinned backend kept the turn (a hit)
    ESTIMATE = "estimate"  # broken: the pinned backend's estimate fell below threshold − break_margin
    UNAVAILABLE = "unavailable"  # broken: the pinned backend is not up
    NOT_ALLOWED = "not_allowed"  # broken: the sending key may not use the pinned backend
    UNKNOWN = "unknown"  # broken: the pinned backend is no longer configured
    EXPLICIT = "explicit"  # the request named a backend: affinity does not apply, nothing is pinned

    @property
    def broken(self) -> bool:
        return self in (Verdict.ESTIMATE, Verdict.UNAVAILABLE, Verdict.NOT_ALLOWED, Verdict.UNKNOWN)


@dataclass(frozen=True)
class Affinity:
    decision: Decision  # what to do: the pinned backend (reason ``affinity``) or the fresh decision unchanged
    verdict: Verdict

    @property
    def pin(self) -> bool:
        """Whether the backend that answers should be pinned (renewed) for the session afterwards."""
        return self.verdict is not Verdict.EXPLICIT


def apply_affinity(decision: Decision, pinned: str | None, *, estimates: Mapping[str, float], threshold: float,
                   break_margin: float, configured: Collection[str], available: Collection[str],
                   allowed: Collection[str] | None = None) -> Affinity:
    """The decision for a request of a session pinned to ``pinned`` (None: no pin), given the fresh ``decision``
    and this turn's ``estimates`` (backend → p; empty when unscored), the threshold in effect for the request,
    the configured backends, those up now, and those the key may use (None: all)."""
    if decision.reason is Reason.EXPLICIT:
        return Affinity(decision, Verdict.EXPLICIT)
    if pinned is None:
        return Affinity(decision, Verdict.NEW)
    if pinned not in configured:
        return Affinity(decision, Verdict.UNKNOWN)
    if pinned not in available:
        return Affinity(decision, Verdict.UNAVAILABLE)
    if allowed is not None and pinned not in allowed:
        return Affinity(decision, Verdict.NOT_ALLOWED)
    p = estimates.get(pinned)
    if p is not None and p < threshold - break_margin:
        return Affinity(decision, Verdict.ESTIMATE)
    order = (pinned, *(name for name in decision.order if name != pinned))
    return Affinity(Decision(pinned, Reason.AFFINITY, order), Verdict.KEPT)
