"""loadtest.conversations' summary and its reading of vLLM's prefix-cache counters."""

from __future__ import annotations

from loadtest.conversations import PREFIX_CACHE, Turn, summarise


def turn(conversation: int, n: int, backend: str, ttft: float | None = 0.1, cached: int | None = None) -> Turn:
    return Turn(conversation, n, backend, "affinity" if n > 1 else "threshold_met", ttft, 1.0, 100, cached)


def test_summary_counts_conversations_kept_on_one_backend() -> None:
    turns = [turn(0, 1, "a"), turn(0, 2, "a", 0.2, 50), turn(0, 3, "a", 0.4, 90),
             turn(1, 1, "b"), turn(1, 2, "a", None, 0), turn(1, 3, "b", 0.3, 60)]
    s = summarise(turns)
    assert s["conversations"] == 2 and s["turns"] == 6
    assert s["share_conversations_on_one_backend"] == 0.5
    assert s["share_later_turns_on_first_backend"] == 0.75
    assert s["median_ttft_s_turn_1"] == 0.1 and s["median_ttft_s_later_turns"] == 0.3
    assert s["cached_share_of_later_prompt_tokens"] == 0.5
    assert s["reasons"] == {"threshold_met": 2, "affinity": 4}


def test_summary_without_cache_details() -> None:
    assert summarise([turn(0, 1, "a"), turn(0, 2, "a")])["cached_share_of_later_prompt_tokens"] is None


def test_prefix_cache_counters_are_read_from_prometheus_text() -> None:
    text = ('# HELP vllm:prefix_cache_hits_total x\nvllm:prefix_cache_hits_total{engine="0",model_name="m"} 120.0\n'
            'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 400.0\nvllm:other_total 3\n')
    assert sorted(PREFIX_CACHE.findall(text)) == [("hits", "120.0"), ("queries", "400.0")]
