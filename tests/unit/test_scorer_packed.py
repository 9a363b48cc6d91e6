"""The packed forward pass (no padding, the shared prefix computed once) against transformers' padded pass."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from itertools import pairwise

import numpy as np
import pytest
import torch.nn.functional as F

from router.config import ScorerConfig
from router.scorer.cpu import native_cpu_dtype
from router.scorer.features import FeatureExtractor
from router.scorer.interface import Chunk, EarlyExit
from router.scorer.packed import PrepackedLinear, padded_rows

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "A"}],
    [{"role": "user", "content": "A robe takes 2 bolts of blue fiber and half that much white fiber. " * 3}],
]


@pytest.mark.parametrize(("layers", "pooling"), [([2], "last"), ([2], "mean"), ([1, 3], "last+mean"),
                                                 ([4], "last"), ([1, 4], "last")])
def test_packed_features_are_transformers_padded_features(tiny_scorer_cfg: ScorerConfig, layers: list[int],
                                                          pooling: str) -> None:
    extractor = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"layers": layers, "pooling": pooling}))
    assert extractor.packed is not None and extractor.packed.prefix is not None
    ids = [extractor.encoder.encode(c) for c in CONVERSATIONS]
    prefix = extractor.packed.prefix.ids
    starts_with_prefix = [i[:len(prefix)] == prefix for i in ids]
    assert any(starts_with_prefix) and not all(starts_with_prefix)  # both kinds of prompt are in the batch
    packed = extractor.features_from_ids(ids)
    padded = extractor.padded_features(ids)
    assert packed.shape == padded.shape == (len(ids), extractor.info.feature_dim)
    np.testing.assert_allclose(packed, padded, rtol=1e-4, atol=1e-5)
    one_at_a_time = np.concatenate([extractor.features_from_ids([i]) for i in ids])
    np.testing.assert_allclose(one_at_a_time, padded, rtol=1e-4, atol=1e-5)


def test_float32_projections_run_on_weights_prepacked_once(tiny_scorer_cfg: ScorerConfig) -> None:
    fp32 = FeatureExtractor(tiny_scorer_cfg)
    assert fp32.packed is not None
    assert all(isinstance(p, PrepackedLinear)
               for p in [*fp32.packed.qkv, *fp32.packed.o, *fp32.packed.gate_up, *fp32.packed.down])
    # the test above: prepacked float32 = transformers' padded pass


def test_bf16_projections_are_prepacked_only_where_the_cpu_multiplies_bf16_natively(
        tiny_scorer_cfg: ScorerConfig) -> None:
    bf16 = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"dtype": "bfloat16"}))
    assert bf16.packed is not None
    native = native_cpu_dtype() == "bfloat16"
    projections = [*bf16.packed.qkv, *bf16.packed.o, *bf16.packed.gate_up, *bf16.packed.down]
    assert all(isinstance(p, PrepackedLinear) == native for p in projections)
    assert PrepackedLinear.suits(bf16.model, frozenset({"amx_bf16"}))
    assert not PrepackedLinear.suits(bf16.model, frozenset({"avx2", "fma"}))
    ids = [bf16.encoder.encode(c) for c in CONVERSATIONS]
    plain = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"dtype": "bfloat16"}))
    assert plain.packed is not None
    for name in ("qkv", "o", "gate_up", "down"):  # the same pass on the plain weights, through F.linear
        setattr(plain.packed, name, [partial(F.linear, weight=p.weight, bias=p.bias)
                                     for p in getattr(plain.packed, name)])
    # bit for bit on the AMX machine of research/perf/README.md; within bf16's rounding wherever oneDNN blocks the
    # product differently
    np.testing.assert_allclose(bf16.features_from_ids(ids), plain.features_from_ids(ids), rtol=1e-2, atol=1e-2)
    fp32 = FeatureExtractor(tiny_scorer_cfg)
    np.testing.assert_allclose(bf16.features_from_ids(ids), fp32.features_from_ids(ids), rtol=0.1, atol=0.1)


def test_a_prompt_cut_from_the_left_runs_without_the_prefix(tiny_scorer_cfg: ScorerConfig) -> None:
    extractor = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"max_prompt_tokens": 24}))
    long = [{"role": "user", "content": "Janet's ducks lay 16 eggs per day. " * 4}]
    ids = [extractor.encoder.encode(long), extractor.encoder.encode(CONVERSATIONS[0])]
    assert len(ids[0]) == 24
    assert extractor.packed is not None and extractor.packed.prefix is not None
    assert ids[0][:len(extractor.packed.prefix.ids)] != extractor.packed.prefix.ids
    np.testing.assert_allclose(extractor.features_from_ids(ids), extractor.padded_features(ids), rtol=1e-4,
                               atol=1e-5)


def test_the_shared_prefix_is_what_every_one_message_prompt_starts_with(tiny_extractor: FeatureExtractor) -> None:
    prefix = tiny_extractor.encoder.shared_prefix()
    assert prefix
    for conversation in (CONVERSATIONS[0], CONVERSATIONS[3]):
        assert tiny_extractor.encoder.encode(conversation)[:len(prefix)] == prefix


def test_packing_off_runs_the_padded_pass(tiny_scorer_cfg: ScorerConfig) -> None:
    extractor = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"packing": False}))
    assert extractor.packed is None
    ids = [extractor.encoder.encode(c) for c in CONVERSATIONS]
    np.testing.assert_array_equal(extractor.features_from_ids(ids), extractor.padded_features(ids))


def test_packed_rows_round_up_to_few_shapes_and_little_padding() -> None:
    rounded = [padded_rows(rows) for rows in range(1, 8193)]
    assert all(r >= rows for rows, r in enumerate(rounded, start=1))
    assert all(r % 16 == 0 for r in rounded)
    assert all(r - rows <= max(15, rows / 16) for rows, r in enumerate(rounded, start=1))
    assert rounded == sorted(rounded)
    assert len(set(rounded)) <= 16 * 13  # about 16 shapes per doubling: oneDNN's cache keeps 1,024 kernels


def test_padding_rows_change_no_feature(tiny_scorer_cfg: ScorerConfig) -> None:
    extractor = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"layers": [1, 3], "pooling": "last+mean"}))
    assert extractor.packed is not None
    ids = [extractor.encoder.encode(c) for c in CONVERSATIONS[1:]]
    prefix = extractor.packed.prefix.ids if extractor.packed.prefix is not None else []
    rows = sum(len(i) - len(prefix) if i[:len(prefix)] == prefix and len(i) > len(prefix) else len(i) for i in ids)
    assert padded_rows(rows) > rows  # the batch is padded
    rounded = extractor.features_from_ids(ids)
    extractor.packed.round_rows = False
    np.testing.assert_allclose(rounded, extractor.features_from_ids(ids), rtol=1e-5, atol=1e-6)


# An early exit inside the pass (PackedDecoder.staged_features): the blocks after it run for the prompts that go on


def _go_on(layer: int) -> EarlyExit:
    return EarlyExit(layer, lambda features: False)


def _stop(layer: int) -> EarlyExit:
    return EarlyExit(layer, lambda features: True)


@pytest.mark.parametrize(("layers", "pooling", "exit_at"), [([2], "last", 1), ([4], "last", 2), ([4], "mean", 3),
                                                            ([1, 4], "last+mean", 2), ([3], "last+mean", 1)])
def test_prompts_that_go_on_get_the_plain_pass_and_early_features_of_that_layer(
        tiny_scorer_cfg: ScorerConfig, layers: list[int], pooling: str, exit_at: int) -> None:
    cfg = tiny_scorer_cfg.model_copy(update={"layers": layers, "pooling": pooling})
    extractor = FeatureExtractor(cfg)
    ids = [extractor.encoder.encode(c) for c in CONVERSATIONS]
    staged = extractor.staged_features_from_ids(ids, [_go_on(exit_at)] * len(ids))
    # no prompt stopped: the same operations as the plain pass, bit for bit
    np.testing.assert_array_equal(np.stack([full for _, full in staged]), extractor.features_from_ids(ids))
    early = np.stack([e for e, _ in staged])
    shallow = FeatureExtractor(cfg.model_copy(update={"layers": [exit_at]}))  # what an early probe trains on
    np.testing.assert_allclose(early, shallow.features_from_ids(ids), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(early, shallow.padded_features(ids), rtol=1e-4, atol=1e-5)
    info = extractor.early_exit_info(exit_at)
    assert info is not None and info.fingerprint == shallow.info.fingerprint
    assert info.feature_dim == early.shape[1]


def test_a_mixed_batch_stops_some_prompts_and_scores_the_others_as_the_plain_pass(
        tiny_scorer_cfg: ScorerConfig) -> None:
    extractor = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"layers": [1, 4], "pooling": "last+mean"}))
    ids = [extractor.encoder.encode(c) for c in CONVERSATIONS]
    plain = extractor.features_from_ids(ids)
    exits = [_stop(2), _go_on(2), None, _stop(1), _go_on(3)]
    staged = extractor.staged_features_from_ids(ids, exits)
    assert [(early is not None, full is not None) for early, full in staged] == [
        (True, False), (True, True), (False, True), (True, False), (True, True)]
    for i in (1, 2, 4):  # packed anew after the others left: the same features within float32's rounding
        np.testing.assert_allclose(staged[i][1], plain[i], rtol=1e-5, atol=1e-6)
    for i, layer in ((0, 2), (1, 2), (3, 1), (4, 3)):
        shallow = FeatureExtractor(extractor.cfg.model_copy(update={"layers": [layer]}))
        np.testing.assert_allclose(staged[i][0], shallow.features_from_ids([ids[i]])[0], rtol=1e-5, atol=1e-6)
    everyone = extractor.staged_features_from_ids(ids, [_stop(2)] * len(ids))
    assert all(full is None and early is not None for early, full in everyone)


def test_a_stopped_prompts_rows_skip_every_block_after_its_exit(tiny_scorer_cfg: ScorerConfig) -> None:
    extractor = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"layers": [4]}))
    decoder = extractor.packed
    assert decoder is not None and decoder.prefix is not None
    decoder.round_rows = False  # rows counted exactly
    rows: list[list[int]] = [[] for _ in decoder.blocks]  # rows each block's q/k/v projection saw

    def counting(index: int, projection):  # type: ignore[no-untyped-def]
        def project(x):  # type: ignore[no-untyped-def]
            rows[index].append(x.shape[0])
            return projection(x)
        return project

    decoder.qkv = [counting(i, p) for i, p in enumerate(decoder.qkv)]
    ids = [extractor.encoder.encode(c) for c in CONVERSATIONS]
    prefix = len(decoder.prefix.ids)
    tails = [len(i) - prefix if i[:prefix] == decoder.prefix.ids and len(i) > prefix else len(i) for i in ids]
    seen: list[np.ndarray] = []

    def stop_first_two(features: np.ndarray) -> bool:
        seen.append(features)
        return len(seen) <= 2

    staged = extractor.staged_features_from_ids(ids, [EarlyExit(2, stop_first_two)] * len(ids))
    assert rows == [[sum(tails)], [sum(tails)], [sum(tails[2:])], [sum(tails[2:])]]
    assert [full is None for _, full in staged] == [True, True, False, False, False]
    for (early, _), decided in zip(staged, seen, strict=True):  # each decision saw the prompt's early features
        np.testing.assert_array_equal(early, decided)


def test_a_decision_that_fails_scores_the_prompt_in_full(tiny_scorer_cfg: ScorerConfig,
                                                         tiny_extractor: FeatureExtractor) -> None:
    def broken(features: np.ndarray) -> bool:
        raise RuntimeError("no probe")

    ids = [tiny_extractor.encoder.encode(c) for c in CONVERSATIONS[:2]]
    staged = tiny_extractor.staged_features_from_ids(ids, [EarlyExit(1, broken), _stop(1)])
    np.testing.assert_array_equal(staged[0][1], tiny_extractor.features_from_ids(ids)[0])
    assert staged[1][1] is None


def test_where_the_pass_cannot_stop_early_it_says_so_and_scores_in_full(tiny_scorer_cfg: ScorerConfig,
                                                                        tiny_extractor: FeatureExtractor) -> None:
    assert tiny_extractor.cfg.layers == [2]
    assert tiny_extractor.early_exit_info(1) is not None
    assert tiny_extractor.early_exit_info(2) is None and tiny_extractor.early_exit_info(3) is None  # not before 2
    padded = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"packing": False}))
    assert padded.early_exit_info(1) is None
    ids = [padded.encoder.encode(c) for c in CONVERSATIONS[:2]]
    for extractor, layer in ((padded, 1), (tiny_extractor, 2)):
        staged = extractor.staged_features_from_ids(ids, [_stop(layer)] * 2)
        assert all(early is None for early, _ in staged)
        np.testing.assert_array_equal(np.stack([full for _, full in staged]), extractor.features_from_ids(ids))
    assert tiny_extractor.packed is not None
    with pytest.raises(ValueError, match="stops early at layers 1 to 1"):
        tiny_extractor.packed.staged_features(ids, [_stop(2)] * 2)


# A long prompt run in chunks (PackedDecoder over Chunk pieces): each chunk attends to the prefix's and its earlier
# chunks' keys and values, only the last pools; the features are the unchunked pass's

LONG = [{"role": "user", "content": "Janet's ducks lay 16 eggs per day. She eats three for breakfast. " * 3}]


def _long(cfg: ScorerConfig, **update: object) -> FeatureExtractor:
    """The tiny scorer with room for ``LONG`` whole."""
    return FeatureExtractor(cfg.model_copy(update={"max_prompt_tokens": 256, **update}))


def _in_chunks(ids: list[int], cuts: list[int]) -> list[Chunk]:
    bounds = [0, *cuts, len(ids)]
    return [Chunk(ids, start, end) for start, end in pairwise(bounds)]


def _run_chunks(extractor: FeatureExtractor, chunks: list[Chunk]) -> np.ndarray:
    """Each chunk in its own pass, in order, the state handed on as the batcher hands it; the last one's row."""
    state = None
    for chunk in chunks:
        chunk.state = state
        (early, full), = extractor.staged_features_from_ids([chunk], [None])
        assert early is None and (full is None) == (not chunk.last)
        state = chunk.state
    assert full is not None
    return full


@pytest.mark.parametrize(("layers", "pooling"), [([2], "last"), ([2], "mean"), ([1, 3], "last+mean"),
                                                 ([4], "last"), ([1, 4], "mean")])
@pytest.mark.parametrize("prefixed", [True, False])
def test_a_prompt_run_in_chunks_gets_the_features_of_its_whole_pass(tiny_scorer_cfg: ScorerConfig, layers: list[int],
                                                                   pooling: str, prefixed: bool) -> None:
    extractor = _long(tiny_scorer_cfg, layers=layers, pooling=pooling)
    assert extractor.packed is not None and extractor.packed.prefix is not None
    ids = extractor.encoder.encode(LONG)
    skip = len(extractor.packed.prefix.ids)
    assert ids[:skip] == extractor.packed.prefix.ids and 64 < len(ids) < 256
    if not prefixed:
        ids = ids[skip:]  # as a prompt cut from the left: no prefix
    whole = extractor.features_from_ids([ids])[0]
    np.testing.assert_allclose(whole, extractor.padded_features([ids])[0], rtol=1e-4, atol=1e-5)
    rng = np.random.default_rng(len(layers) + 7 * prefixed)
    # chunk boundaries inside the prefix, at its end, just after it, anywhere
    cut_sets = [[1], [skip - 1], [skip], [skip + 1], [len(ids) - 1], [16, 32, 48], list(range(9, len(ids), 9))]
    cut_sets.append(sorted(rng.choice(np.arange(1, len(ids)), size=4, replace=False).tolist()))
    for cuts in cut_sets:
        np.testing.assert_allclose(_run_chunks(extractor, _in_chunks(ids, cuts)), whole, rtol=1e-5, atol=1e-5,
                                   err_msg=f"cut at {cuts}")


@pytest.mark.parametrize("pooling", ["last", "mean", "last+mean"])
def test_chunks_of_two_prompts_share_passes_with_whole_short_prompts(tiny_scorer_cfg: ScorerConfig,
                                                                     pooling: str) -> None:
    extractor = _long(tiny_scorer_cfg, layers=[1, 3], pooling=pooling)
    assert extractor.packed is not None and extractor.packed.prefix is not None
    skip = len(extractor.packed.prefix.ids)
    long_ids = extractor.encoder.encode(LONG)
    other = extractor.encoder.encode([{"role": "user", "content": "A robe takes 2 bolts of blue fiber. " * 6}])[skip:]
    short = [extractor.encoder.encode(c) for c in CONVERSATIONS]
    expected = extractor.features_from_ids([long_ids, other, *short])
    first, second = _in_chunks(long_ids, [20, 45]), _in_chunks(other, [7, 30])
    assert len(long_ids) > 45 and len(other) > 30
    passes: list[list[Sequence[int] | Chunk]] = [[first[0], short[0], second[0]], [short[1], second[1], first[1]],
                                                 [first[2], short[2], short[3]], [second[2], short[4]]]
    rows: dict[int, np.ndarray] = {}
    for batch in passes:
        for piece in batch:  # a later chunk gets its prompt's state from the one before, as the batcher hands it on
            if isinstance(piece, Chunk) and piece.start:
                chunks = first if piece in first else second
                piece.state = chunks[chunks.index(piece) - 1].state
        staged = extractor.staged_features_from_ids(batch, [None] * len(batch))
        for piece, (early, full) in zip(batch, staged, strict=True):
            assert early is None
            if isinstance(piece, Chunk) and not piece.last:
                assert full is None
                continue
            assert full is not None
            which = (0 if piece in first else 1) if isinstance(piece, Chunk) else 2 + short.index(list(piece))
            rows[which] = full
    np.testing.assert_allclose(np.stack([rows[i] for i in range(len(expected))]), expected, rtol=1e-5, atol=1e-5)


def test_an_early_exit_still_stops_short_prompts_beside_a_chunk_which_is_scored_in_full(
        tiny_scorer_cfg: ScorerConfig) -> None:
    extractor = _long(tiny_scorer_cfg, layers=[4], pooling="last+mean")
    assert extractor.packed is not None
    long_ids = extractor.encoder.encode(LONG)
    short = [extractor.encoder.encode(c) for c in CONVERSATIONS[:3]]
    plain = extractor.features_from_ids([long_ids, *short])
    chunks = _in_chunks(long_ids, [30])
    exits = [_stop(2), _go_on(2), None]
    first = extractor.staged_features_from_ids([chunks[0], *short], [_stop(2), *exits])  # the chunk's exit: ignored
    assert first[0] == (None, None)
    assert [(early is not None, full is not None) for early, full in first[1:]] == [(True, False), (True, True),
                                                                                   (False, True)]
    for i in (1, 2):
        np.testing.assert_allclose(first[1 + i][1], plain[1 + i], rtol=1e-5, atol=1e-6)
    shallow = FeatureExtractor(extractor.cfg.model_copy(update={"layers": [2]}))
    np.testing.assert_allclose(first[1][0], shallow.features_from_ids([short[0]])[0], rtol=1e-5, atol=1e-6)
    chunks[1].state = chunks[0].state
    last = extractor.staged_features_from_ids([short[0], chunks[1]], [_stop(2), None])  # others stop: repacked
    assert last[0][1] is None and last[1][0] is None
    np.testing.assert_allclose(last[1][1], plain[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="takes no early exit"):
        extractor.packed.staged_features([Chunk(long_ids, 0, 10)], [_stop(2)])


def test_a_prompts_chunks_run_in_order_each_once_and_keep_bounded_state(tiny_scorer_cfg: ScorerConfig) -> None:
    extractor = _long(tiny_scorer_cfg)
    decoder = extractor.packed
    assert decoder is not None
    ids = extractor.encoder.encode(LONG)
    first, second, third = _in_chunks(ids, [20, 40])
    with pytest.raises(ValueError, match="first chunk starts at token 20"):
        decoder.features([second])
    decoder.features([first])
    state = first.state
    assert state is not None
    # keys and values for every block, with room for the whole prompt and no more
    assert state.nbytes == 2 * len(decoder.blocks) * decoder.kv_heads * decoder.head_dim * len(ids) * 4
    third.state = state
    with pytest.raises(ValueError, match="run in order"):
        decoder.features([third])
    second.state = state
    decoder.features([second])
    with pytest.raises(ValueError, match="run in order"):  # the same chunk again
        decoder.features([second])
    with pytest.raises(ValueError, match="only the packed pass"):
        FeatureExtractor(tiny_scorer_cfg.model_copy(update={"packing": False})).staged_features_from_ids(
            [Chunk(ids, 0, 10)], [None])
