"""Fitting: nested CV never reports on training rows, label sharing, the probe file agrees with the fit, and a
recipe's columns sliced from a wide extraction equal what a scorer configured that way computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probes.fit import fit_probe, nested_oof
from probes.metrics import auroc
from probes.recipes import Recipe, columns, parse_recipes

ROOT = Path(__file__).resolve().parents[2]


def synthetic(n: int = 300, d: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 5, d) + rng.normal(size=d)
    y = (x[:, 0] / 3 + rng.normal(size=n) > 0).astype(np.int64)
    return x, y


def test_nested_oof_is_honest_on_noise() -> None:
    x, _ = synthetic(n=400, d=200)
    y = np.random.default_rng(1).integers(0, 2, 400)  # labels unrelated to x: in-sample fits would look good
    result = nested_oof(x, [y], y, folds=5, seed=0)
    assert abs(auroc(y, result.probability) - 0.5) < 0.1
    assert len(result.chosen) == 5


def test_nested_oof_finds_signal_and_is_seeded() -> None:
    x, y = synthetic()
    a = nested_oof(x, [y], y, folds=3, seed=0)
    b = nested_oof(x, [y], y, folds=3, seed=0)
    np.testing.assert_array_equal(a.probability, b.probability)
    assert auroc(y, a.probability) > 0.7
    assert ((a.probability > 0) & (a.probability < 1)).all()


def test_wide_features_fit_in_the_row_span_is_exact() -> None:
    from sklearn.linear_model import LogisticRegression

    from probes.fit import _lr_path

    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 120))  # more features than rows: fitted in the rows' span
    y = (x[:, 0] + rng.normal(size=50) > 0).astype(np.int64)
    (w, b), = _lr_path(x, [y], [0.05])
    direct = LogisticRegression(C=0.05, max_iter=10000, tol=1e-10).fit(x, y)
    np.testing.assert_allclose(x @ w + b, direct.decision_function(x), atol=1e-3)


def test_fit_probe_matches_its_file_format_and_shares_labels() -> None:
    x, y = synthetic()
    other = np.where(np.random.default_rng(3).random(len(y)) < 0.1, 1 - y, y)  # a noisier related label set
    fitted = fit_probe(x, y, folds=3, seed=0, train_labels=[y, other])
    p = fitted.probe.predict(x)
    assert p.shape == (len(y),) and auroc(y, p) > 0.7
    assert fitted.probe.platt_a > 0
    with pytest.raises(ValueError, match="both successes and failures"):
        fit_probe(x, np.ones(len(y), dtype=np.int64), folds=3)


def test_a_graded_label_trains_as_the_binary_label_sets_it_summarises() -> None:
    """A success rate of k/4 trains exactly as four stacked 0/1 label sets with k successes: the same weighted
    objective, so the same weights (what lets a probe learn from k sampled answers a question)."""
    from probes.fit import _lr_path

    x, y = synthetic(n=200, d=8)
    rng = np.random.default_rng(4)
    runs = [np.where(rng.random(len(y)) < 0.2, 1 - y, y) for _ in range(4)]  # four noisy samples a question
    graded = np.mean(runs, axis=0)  # 0, 0.25, ..., 1
    for (w_graded, b_graded), (w_runs, b_runs) in zip(_lr_path(x, [graded], [0.04, 4.0]),
                                                      _lr_path(x, runs, [0.01, 1.0]), strict=True):
        # four sets weigh each row four times where one graded set weighs it once: C × 4 matches them
        np.testing.assert_allclose(w_graded, w_runs, rtol=1e-5, atol=1e-8)
        assert b_graded == pytest.approx(b_runs, abs=1e-6)


def test_training_labels_read_correctness_or_a_success_rate(tmp_path: Path) -> None:
    from probes.data import load_dataset

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(
        f'{{"question": "q{i}", "correct": {{"m": {i % 2}}}, "success_rate": {{"m@k4": {i / 4}}}}}'
        for i in range(3)))
    data = load_dataset(path)
    np.testing.assert_array_equal(data.training_labels("m"), [0, 1, 0])
    np.testing.assert_allclose(data.training_labels("m@k4"), [0.0, 0.25, 0.5])
    with pytest.raises(KeyError, match="neither a label nor a success rate for 'other' on 3 of 3"):
        data.training_labels("other")


def test_label_sets_are_those_every_question_has(tmp_path: Path) -> None:
    from probes.data import load_dataset

    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "correct": {"m": 1, "k": 0, "x": 1}, "success_rate": {"m@k4": 0.5}}\n'
                    '{"question": "b", "correct": {"m": 0, "k": 1}, "success_rate": {"m@k4": 0.25, "y@k2": 1}}\n')
    assert load_dataset(path).label_sets() == ["k", "m", "m@k4"]  # "x" and "y@k2" miss a question


def test_recipe_columns() -> None:
    recipes = parse_recipes(["15", "12+18"], ["last", "last+mean"])
    assert recipes[1] == Recipe((15,), "last+mean") and recipes[2] == Recipe((12, 18), "last")
    # source: layers [12, 15, 18] × (last, mean), hidden 2 → columns [12L 12L 12M 12M 15L 15L 15M 15M 18L …]
    np.testing.assert_array_equal(columns(Recipe((15,), "mean"), [12, 15, 18], "last+mean", 2), [6, 7])
    np.testing.assert_array_equal(columns(Recipe((12, 18), "last"), [12, 15, 18], "last+mean", 2), [0, 1, 8, 9])
    with pytest.raises(ValueError):
        columns(Recipe((3,), "last"), [12], "last+mean", 2)
    with pytest.raises(ValueError):
        parse_recipes(["3"], ["max"])


def test_sliced_columns_equal_a_scorer_configured_that_way() -> None:
    from router.config import load_settings
    from router.scorer.features import FeatureExtractor

    scorer = load_settings(ROOT / "config.yaml").scorer
    if not (Path(scorer.cache_dir) / "SmolLM2-135M-Instruct").exists():
        pytest.skip("the scorer model is not cached")
    conversations = [[{"role": "user", "content": q}] for q in ("What is 2+2?", "A longer question about ducks?")]
    wide = FeatureExtractor(scorer.model_copy(update={"layers": [2, 4], "pooling": "last+mean"}))
    narrow = FeatureExtractor(scorer.model_copy(update={"layers": [4], "pooling": "mean"}))
    hidden = wide.info.hidden_size
    sliced = wide.features(conversations)[:, columns(Recipe((4,), "mean"), [2, 4], "last+mean", hidden)]
    np.testing.assert_allclose(sliced, narrow.features(conversations), rtol=1e-5, atol=1e-5)


def test_stacked_probe_reads_activations_and_text_in_one_linear_model() -> None:
    from probes.fit import Inputs, fit_calibrated, nested_oof, probe_model
    from router.text_features import prompt_text

    rng = np.random.default_rng(0)
    n = 400
    hard_word = rng.uniform(size=n) < 0.5
    act = rng.normal(size=(n, 6))
    logit = 1.5 * act[:, 0] - 2.0 * hard_word
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    texts = tuple(("a tricky puzzle about " if h else "a plain sum about ") + f"item {i % 7}"
                  for i, h in enumerate(hard_word))
    x = Inputs(act, texts)
    model, grid = probe_model("tfidf+length")
    joint = nested_oof(x, [y], y, cs=grid, folds=3, seed=0, model=model)
    alone = nested_oof(act, [y], y, folds=3, seed=0)
    assert auroc(y, joint.probability) > auroc(y, alone.probability) + 0.03
    fitted = fit_calibrated(x, [y], y, cs=grid, folds=3, seed=0, model=model)
    probe = fitted.scorer.probe()
    dense = np.hstack([act, probe.text.dense([prompt_text([{"role": "user", "content": t}]) for t in texts])])
    assert np.allclose(probe.decision(dense), fitted.scorer.decision(x))
