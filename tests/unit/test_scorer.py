from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from router.config import ScorerConfig
from router.scorer.batcher import MicroBatcher
from router.scorer.features import FeatureExtractor
from router.scorer.interface import BatchStats, ScorerUnavailable
from router.scorer.local import LocalScorer
from router.scorer.recipe import normalise_messages

QUESTIONS = [
    "What is 2 + 2?",
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning. How many are left?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.",
    "Capital of France?",
]


def conv(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def test_render_applies_the_chat_template_with_the_generation_prompt(tiny_extractor: FeatureExtractor) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tiny_extractor.encoder.render(messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_encoder_renders_and_tokenises_as_transformers_does(tiny_extractor: FeatureExtractor,
                                                                   tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_model_dir)
    for q in QUESTIONS:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
        ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert tiny_extractor.encoder.encode(messages) == list(ids)[-tiny_extractor.cfg.max_prompt_tokens:]


def test_content_parts_and_developer_role_are_normalised() -> None:
    got = normalise_messages([{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "image_url"},
                                                                  {"type": "text", "text": "b"}]},
                              {"role": "assistant", "content": None}])
    assert got == [{"role": "system", "content": "a\nb"}, {"role": "assistant", "content": ""}]


def test_batched_and_one_at_a_time_features_agree(tiny_extractor: FeatureExtractor) -> None:
    batched = tiny_extractor.features([conv(q) for q in QUESTIONS])
    single = np.concatenate([tiny_extractor.features([conv(q)]) for q in QUESTIONS])
    assert batched.shape == (4, tiny_extractor.info.feature_dim)
    np.testing.assert_allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("final_norm", [True, False])
def test_features_are_the_full_models_states_after_the_layer(tiny_scorer_cfg: ScorerConfig, tiny_model_dir: Path,
                                                             final_norm: bool) -> None:
    from transformers import AutoModelForCausalLM

    extractor = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"final_norm": final_norm}))
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = extractor.encoder.encode(conv(QUESTIONS[2]))
    assert len(ids) < extractor.cfg.max_prompt_tokens  # no truncation in play
    with torch.inference_mode():
        hidden = full(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        # hidden_states[2] of the 4-block model is block 2's raw output; final_norm applies the model's own norm
        expected = (full.model.norm(hidden[2]) if final_norm else hidden[2])[0, -1].numpy()
    assert len(extractor.model.layers) == 2  # blocks after the probed layer are not loaded
    np.testing.assert_allclose(extractor.features([conv(QUESTIONS[2])])[0], expected, atol=1e-5)


def test_long_prompts_keep_their_end(tiny_extractor: FeatureExtractor) -> None:
    limit = tiny_extractor.cfg.max_prompt_tokens
    ids = tiny_extractor.encoder.encode(conv("eggs " * 500 + QUESTIONS[0]))
    kept = tiny_extractor.encoder.tokenizer.decode(ids, skip_special_tokens=False)
    assert len(ids) == limit
    assert kept.endswith(QUESTIONS[0] + "<|im_end|>\n<|im_start|>assistant\n")
    assert np.isfinite(tiny_extractor.features([conv("eggs " * 500 + QUESTIONS[0])])).all()


def test_several_layers_and_poolings_concatenate(tiny_scorer_cfg: ScorerConfig) -> None:
    cfg = tiny_scorer_cfg.model_copy(update={"layers": [1, 3], "pooling": "last+mean"})
    fx = FeatureExtractor(cfg)
    assert fx.info.feature_dim == 32 * 2 * 2
    assert fx.features([conv(QUESTIONS[0])]).shape == (1, 128)


def test_fingerprint_depends_on_the_recipe(tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    again = FeatureExtractor(tiny_scorer_cfg)
    other = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"layers": [3]}))
    assert again.info.fingerprint == tiny_extractor.info.fingerprint
    assert other.info.fingerprint != tiny_extractor.info.fingerprint


def test_asking_for_a_layer_the_model_lacks_is_an_error(tiny_scorer_cfg: ScorerConfig) -> None:
    with pytest.raises(ValueError, match="has 4"):
        FeatureExtractor(tiny_scorer_cfg.model_copy(update={"layers": [9]}))


async def test_micro_batcher_batches_concurrent_requests_and_matches_direct_features(
    tiny_extractor: FeatureExtractor,
) -> None:
    stats: list[BatchStats] = []
    scorer = LocalScorer(tiny_extractor, tiny_extractor.cfg.model_copy(update={"max_wait_ms": 50}))
    await scorer.start(on_batch=stats.append)
    try:
        results = await asyncio.gather(*(scorer.score(conv(q)) for q in QUESTIONS * 2))
    finally:
        await scorer.aclose()
    direct = tiny_extractor.features([conv(q) for q in QUESTIONS * 2])
    np.testing.assert_allclose(np.stack([r.features for r in results]), direct, atol=1e-5)
    assert [r.prompt_tokens for r in results] == [len(tiny_extractor.encoder.encode(conv(q))) for q in QUESTIONS * 2]
    assert sum(s.size for s in stats) == 8 and max(s.size for s in stats) > 1
    assert all(s.size <= 4 for s in stats)


async def test_micro_batcher_reports_failures_and_a_full_queue() -> None:
    def broken(_: object) -> np.ndarray:
        raise RuntimeError("no model")

    batcher = MicroBatcher(broken, max_batch_size=2, max_wait_s=0.0, max_queue=1)
    try:
        with pytest.raises(ScorerUnavailable, match="scorer failed: no model"):
            await batcher.run([1])
        assert batcher.alive  # one bad batch does not kill the worker
    finally:
        batcher.close()
    with pytest.raises(ScorerUnavailable, match="stopped"):
        await batcher.run([1])


async def test_micro_batcher_refuses_at_once_what_it_could_not_score_in_time() -> None:
    release = threading.Event()

    def slow(conversations: Sequence[object]) -> np.ndarray:
        release.wait(10)
        return np.zeros((len(conversations), 2), dtype=np.float32)

    batcher = MicroBatcher(slow, max_batch_size=1, max_wait_s=0.0, max_queue=64)
    try:
        assert batcher.expected_wait_s() == 0.0  # nothing timed yet: nothing refused
        release.set()
        await batcher.run([1], timeout_s=5.0)  # times one pass
        release.clear()
        per_prompt = batcher.expected_wait_s()
        assert per_prompt > 0
        blocked = [asyncio.create_task(batcher.run([i], timeout_s=5.0)) for i in range(3)]
        await asyncio.sleep(0)  # all three are queued (one of them in the worker, held by `release`)
        budget = per_prompt * 2.5  # less than the four passes ahead of the next request
        with pytest.raises(ScorerUnavailable, match="queue would take about") as refused:
            await batcher.run([9], timeout_s=budget)
        assert refused.value.kind == "overloaded"
        assert not any(t.done() for t in blocked)  # refused while the others still wait: it did not queue
        release.set()
        await asyncio.gather(*blocked)
    finally:
        release.set()
        batcher.close()


async def test_micro_batcher_warms_up_and_times_a_pass_before_the_first_request() -> None:
    seen: list[int] = []

    def features(conversations: Sequence[object]) -> np.ndarray:
        seen.append(len(conversations))
        return np.zeros((len(conversations), 2), dtype=np.float32)

    batcher = MicroBatcher(features, max_batch_size=4, max_wait_s=0.0, max_queue=8, warmup=[7])
    try:
        await batcher.run([1])
        assert seen[:2] == [1, 1]  # the two warm-up passes ran before the request's own
        assert batcher.expected_wait_s() > 0  # ... and seeded the estimate
    finally:
        batcher.close()


async def test_several_workers_run_passes_side_by_side_each_set_up_first() -> None:
    both_in_a_pass = threading.Barrier(2, timeout=10)  # passes only get past it two at a time
    set_up: list[str] = []

    def features(batch: Sequence[object]) -> np.ndarray:
        assert threading.current_thread().name in set_up  # the worker's set-up ran before its first pass
        both_in_a_pass.wait()
        return np.zeros((len(batch), 2), dtype=np.float32)

    batcher = MicroBatcher(features, max_batch_size=1, max_wait_s=0.0, max_queue=8, workers=2,
                           worker_setup=lambda: set_up.append(threading.current_thread().name))
    try:
        results = await asyncio.wait_for(asyncio.gather(*(batcher.run([i]) for i in range(4))), timeout=20)
        assert len(results) == 4 and sorted(set_up) == ["scorer-0", "scorer-1"]
        assert batcher.alive
    finally:
        batcher.close()
    assert not batcher.alive


async def test_the_wait_estimate_shares_the_queue_among_the_workers() -> None:
    estimates = []
    for workers in (1, 2):
        batcher = MicroBatcher(lambda b: np.zeros((len(b), 2), dtype=np.float32), max_batch_size=1, max_wait_s=0.0,
                               max_queue=8, workers=workers)
        try:
            batcher._token_s = 0.4  # as if timed: a token (this one-token prompt) takes 0.4 s in one worker
            estimates.append(batcher.expected_wait_s())
        finally:
            batcher.close()
    assert estimates == [pytest.approx(0.4), pytest.approx(0.2)]


async def test_closing_answers_what_is_still_queued_and_lets_running_passes_finish() -> None:
    release = threading.Event()

    def held(batch: Sequence[object]) -> np.ndarray:
        release.wait(10)
        return np.zeros((len(batch), 2), dtype=np.float32)

    batcher = MicroBatcher(held, max_batch_size=1, max_wait_s=0.0, max_queue=8, workers=2)
    running = [asyncio.create_task(batcher.run([i], timeout_s=20)) for i in range(2)]
    await asyncio.sleep(0.2)  # both workers hold a request
    queued = asyncio.create_task(batcher.run([9], timeout_s=20))
    await asyncio.sleep(0.05)
    batcher.close(timeout_s=0.1)  # the workers are still in their passes
    with pytest.raises(ScorerUnavailable, match="stopped"):
        await queued
    release.set()
    await asyncio.wait_for(asyncio.gather(*running), timeout=10)  # the passes under way finish
    for thread in batcher._threads:  # ... and each worker then takes its stop mark
        thread.join(10)
        assert not thread.is_alive()


async def test_local_scorer_shares_the_cores_among_its_workers(tiny_extractor: FeatureExtractor) -> None:
    cores = torch.get_num_threads()
    two = LocalScorer(tiny_extractor, tiny_extractor.cfg.model_copy(update={"workers": 2, "threads": None}))
    assert two.threads_per_worker() == max(1, cores // 2)
    pinned = LocalScorer(tiny_extractor, tiny_extractor.cfg.model_copy(update={"workers": 2, "threads": 3}))
    assert pinned.threads_per_worker() == 3
    await two.start()
    try:
        rows = await asyncio.gather(*(two.score(conv(q)) for q in QUESTIONS))
    finally:
        await two.aclose()
        torch.set_num_threads(cores)  # torch's count is process-wide: the workers set it
    direct = tiny_extractor.features([conv(q) for q in QUESTIONS])
    np.testing.assert_allclose(np.stack([r.features for r in rows]), direct, atol=1e-5)


async def _batch_sizes(count: int, every_s: float, **batching: float) -> list[int]:
    """The batch sizes a batcher forms for ``count`` requests arriving ``every_s`` apart."""
    sizes: list[int] = []

    def features(batch: Sequence[object]) -> np.ndarray:
        sizes.append(len(batch))
        return np.zeros((len(batch), 2), dtype=np.float32)

    batcher = MicroBatcher(features, max_queue=64, **batching)  # type: ignore[arg-type]
    try:
        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(batcher.run([i], timeout_s=30)))
            await asyncio.sleep(every_s)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)  # a lone request: long before max_batch_wait
    finally:
        batcher.close()
    return sizes


async def test_a_batch_waits_as_long_as_requests_keep_joining_it() -> None:
    # each request comes 20 ms after the one before: more than max_wait would allow counted from the first
    assert await _batch_sizes(4, 0.02, max_batch_size=4, max_wait_s=0.5, max_batch_wait_s=30.0) == [4]


async def test_a_batch_starts_at_max_batch_wait_however_many_keep_coming() -> None:
    sizes = await _batch_sizes(6, 0.05, max_batch_size=8, max_wait_s=0.1, max_batch_wait_s=0.15)
    assert sum(sizes) == 6 and sizes[0] < 6


async def test_a_lone_request_waits_max_wait_not_max_batch_wait() -> None:
    assert await _batch_sizes(1, 0.0, max_batch_size=8, max_wait_s=0.01, max_batch_wait_s=60.0) == [1]


def _full_render(fx: FeatureExtractor, messages: list[dict[str, str]]) -> str:
    """The prompt as it was rendered before inputs were bounded: every message whole."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[normalise_messages(messages)], chat_template=fx.encoder.template,
                                        add_generation_prompt=True, **fx.encoder.special_tokens)
    return rendered[0]


def _ids(fx: FeatureExtractor, prompt: str) -> list[int]:
    return fx.encoder.encode_prompts([prompt])[0]


def test_prompts_within_the_limit_are_rendered_and_scored_exactly_as_before(tiny_extractor: FeatureExtractor) -> None:
    limit = tiny_extractor.cfg.max_prompt_tokens
    conversations = [conv(q) for q in QUESTIONS] + [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "eggs " * (limit - 20)}],
        [{"role": "user", "content": "x"}] * (limit // 8),
    ]
    for c in conversations:
        assert tiny_extractor.encoder.render(c) == _full_render(tiny_extractor, c)
    before = tiny_extractor.features_from_ids([_ids(tiny_extractor, _full_render(tiny_extractor, c))
                                               for c in conversations])
    np.testing.assert_array_equal(tiny_extractor.features(conversations), before)


def test_a_huge_prompt_is_cut_before_rendering_and_scores_as_its_end(tiny_extractor: FeatureExtractor) -> None:
    """A 4 MB prompt was rendered and tokenised whole before being cut to max_prompt_tokens. Now the text is cut
    first, keeping its end: the rendered prompt is bounded, still holds more than max_prompt_tokens tokens, and
    the features are those of the whole prompt."""
    encoder = tiny_extractor.encoder
    limit = tiny_extractor.cfg.max_prompt_tokens
    huge = [{"role": "system", "content": "s " * 100_000},
            {"role": "user", "content": "eggs " * 800_000 + QUESTIONS[1]}]  # 4 MB
    rendered = encoder.render(huge)
    assert len(rendered) <= limit * encoder.max_token_chars + 200
    assert rendered.endswith(QUESTIONS[1] + "<|im_end|>\n<|im_start|>assistant\n")
    assert len(encoder.tokenizer.encode(rendered, add_special_tokens=False).ids) > limit
    moderate = [{"role": "system", "content": "s " * 1000}, {"role": "user", "content": "eggs " * 8000 + QUESTIONS[1]}]
    np.testing.assert_array_equal(
        tiny_extractor.features([huge]),
        tiny_extractor.features_from_ids([_ids(tiny_extractor, _full_render(tiny_extractor, moderate))]),
    )
    many = [{"role": "user", "content": "x"}] * 100_000  # many small messages are bounded too
    assert len(encoder.render(many)) < len(_full_render(tiny_extractor, many[:limit])) + 1
