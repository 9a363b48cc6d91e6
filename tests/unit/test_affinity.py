"""Session affinity's pure parts: which session a request belongs to, and whether a turn keeps its pin."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from router.affinity import SOURCES, Verdict, apply_affinity, opening_digest, session_of
from router.config import AffinityConfig, Settings
from router.policy import Decision, Reason

SYSTEM = {"role": "system", "content": "You are terse."}


def conversation(turns: int, *, system: bool = True) -> list[dict]:
    """A chat of ``turns`` user turns, each but the last answered."""
    messages = [SYSTEM] if system else []
    for t in range(turns):
        messages.append({"role": "user", "content": f"question {t}"})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": f"answer {t}"})
    return messages


def test_every_later_turn_of_a_conversation_names_the_same_session() -> None:
    sessions = [session_of(Headers(), {}, conversation(t)) for t in range(1, 7)]
    assert all(s is not None and s.source == "opening" for s in sessions)
    assert len({s.key for s in sessions if s}) == 1
    assert sessions[0] is not None and not sessions[0].lookup  # a first turn only pins
    assert all(s is not None and s.lookup for s in sessions[1:])


def test_conversations_with_other_openings_are_other_sessions() -> None:
    base = session_of(Headers(), {}, conversation(3))
    other_question = conversation(3)
    other_question[1] = {"role": "user", "content": "something else"}
    other_system = [{"role": "system", "content": "You are verbose."}, *conversation(3)[1:]]
    no_system = conversation(3, system=False)
    keys = {s.key for s in (base, session_of(Headers(), {}, other_question), session_of(Headers(), {}, other_system),
                            session_of(Headers(), {}, no_system)) if s}
    assert len(keys) == 4


def test_developer_is_read_as_system_and_content_parts_as_their_text() -> None:
    plain = conversation(2)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "question 0"}]}, *plain[2:]]
    assert opening_digest(plain) == opening_digest(parts)


def test_a_conversation_without_a_user_message_first_has_no_opening() -> None:
    assert opening_digest([{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]) is None
    assert opening_digest([SYSTEM]) is None
    assert session_of(Headers(), {}, []) is None


def test_sources_in_order_header_first() -> None:
    body = {"user": "u1", "prompt_cache_key": "pk"}
    messages = conversation(2)
    by_header = session_of(Headers({"X-Session-Id": "s1"}), body, messages)
    assert by_header is not None and by_header.source == "header" and by_header.lookup
    assert session_of(Headers(), body, messages).source == "prompt_cache_key"  # type: ignore[union-attr]
    assert session_of(Headers(), {"user": "u1"}, messages).source == "user"  # type: ignore[union-attr]
    assert session_of(Headers(), {"user": "  "}, messages).source == "opening"  # type: ignore[union-attr]
    assert session_of(Headers(), {"user": 7}, messages).source == "opening"  # type: ignore[union-attr]
    only_opening = session_of(Headers({"x-session-id": "s1"}), body, messages, sources=["opening"])
    assert only_opening is not None and only_opening.source == "opening"
    assert session_of(Headers(), {}, messages, sources=["header", "user"]) is None
    custom = session_of(Headers({"x-conversation": "c"}), {}, messages, header="x-conversation")
    assert custom is not None and custom.source == "header"


def test_sessions_are_scoped_by_key_and_source_and_hashed() -> None:
    a = session_of(Headers({"x-session-id": "same"}), {}, [], owner="team-a")
    b = session_of(Headers({"x-session-id": "same"}), {}, [], owner="team-b")
    as_user = session_of(Headers(), {"user": "same"}, [], owner="team-a")
    assert a and b and as_user
    assert len({a.key, b.key, as_user.key}) == 3
    assert "same" not in a.key and len(a.key) == 32
    huge = session_of(Headers(), {"user": "x" * 10_000}, [])
    assert huge is not None and len(huge.key) == 32


def test_unknown_source_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown affinity source"):
        session_of(Headers(), {}, [], sources=["cookie"])


FRESH = Decision("cheap", Reason.THRESHOLD, ("cheap", "dear"))
CONFIGURED = {"cheap", "dear"}


def decide(pinned: str | None, estimates: dict[str, float], *, threshold: float = 0.8, margin: float = 0.1,
           available: set[str] = CONFIGURED, allowed: set[str] | None = None, decision: Decision = FRESH):
    return apply_affinity(decision, pinned, estimates=estimates, threshold=threshold, break_margin=margin,
                          configured=CONFIGURED, available=available, allowed=allowed)


def test_no_pin_keeps_the_fresh_decision_and_pins_it() -> None:
    result = decide(None, {"cheap": 0.9, "dear": 0.95})
    assert result.decision == FRESH and result.verdict is Verdict.NEW and result.pin


def test_a_pinned_backend_keeps_the_turn_while_its_estimate_is_within_the_margin() -> None:
    result = decide("dear", {"cheap": 0.9, "dear": 0.75})  # 0.75 >= 0.8 - 0.1
    assert result.verdict is Verdict.KEPT and result.pin
    assert result.decision == Decision("dear", Reason.AFFINITY, ("dear", "cheap"))
    assert decide("dear", {"dear": 0.5}, threshold=0.75, margin=0.25).verdict is Verdict.KEPT  # exactly at it


def test_a_pinned_backend_whose_estimate_drops_below_the_margin_breaks() -> None:
    result = decide("cheap", {"cheap": 0.69, "dear": 0.9}, decision=Decision("dear", Reason.FALLBACK,
                                                                             ("dear", "cheap")))
    assert result.verdict is Verdict.ESTIMATE and result.verdict.broken and result.pin
    assert result.decision.backend == "dear" and result.decision.reason is Reason.FALLBACK


def test_margin_zero_breaks_below_the_threshold_and_one_never() -> None:
    assert decide("cheap", {"cheap": 0.79}, margin=0.0).verdict is Verdict.ESTIMATE
    assert decide("cheap", {"cheap": 0.0}, margin=1.0).verdict is Verdict.KEPT


def test_the_threshold_in_effect_is_the_requests() -> None:
    assert decide("cheap", {"cheap": 0.85}, threshold=0.99).verdict is Verdict.ESTIMATE
    assert decide("cheap", {"cheap": 0.85}, threshold=0.9).verdict is Verdict.KEPT


def test_unscored_turns_keep_their_pin() -> None:
    unscored = Decision("dear", Reason.UNSCORED, ("dear", "cheap"))
    result = decide("cheap", {}, decision=unscored)
    assert result.verdict is Verdict.KEPT and result.decision.backend == "cheap"


@pytest.mark.parametrize(("pinned", "available", "allowed", "verdict"), [
    ("gone", CONFIGURED, None, Verdict.UNKNOWN),
    ("cheap", {"dear"}, None, Verdict.UNAVAILABLE),
    ("cheap", CONFIGURED, {"dear"}, Verdict.NOT_ALLOWED),
])
def test_breaks_when_the_pinned_backend_cannot_serve(pinned: str, available: set[str], allowed: set[str] | None,
                                                     verdict: Verdict) -> None:
    result = decide(pinned, {"cheap": 0.99, "dear": 0.99}, available=available, allowed=allowed)
    assert result.verdict is verdict and result.verdict.broken
    assert result.decision == FRESH


def test_a_request_naming_a_backend_is_not_affected_and_pins_nothing() -> None:
    named = Decision("dear", Reason.EXPLICIT, ("dear",))
    result = decide("cheap", {}, decision=named)
    assert result.decision == named and result.verdict is Verdict.EXPLICIT and not result.pin
    assert not result.verdict.broken


def test_config_defaults_and_validation() -> None:
    cfg = AffinityConfig()
    assert cfg.enabled and tuple(cfg.sources) == SOURCES and cfg.header == "x-session-id"
    with pytest.raises(ValueError, match="at most once"):
        AffinityConfig(sources=["user", "user"])
    with pytest.raises(ValueError):
        AffinityConfig(sources=["cookie"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        AffinityConfig(header="x session")
    settings = Settings(backends=[{"name": "a", "base_url": "http://127.0.0.1:1/v1", "model": "m", "probe": "p",
                                   "input_cost_per_mtok": 1, "output_cost_per_mtok": 1}])
    assert settings.affinity.break_margin == 0.1
