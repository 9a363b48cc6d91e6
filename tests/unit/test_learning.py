"""The learning core (router/learning): the learner's maths, the guard, the store, the registry, exploration and
the threshold controller, on synthetic data with known answers."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from router.learning import (
    ExampleStore,
    LabelledExample,
    Learner,
    LearnerSettings,
    Observation,
    Registry,
    RegistryError,
    TargetKind,
    ThresholdController,
    explore,
    learn,
    make_entry,
    propensity,
    unit_hash,
)
from router.learning.fitting import auroc, ece, fit_logistic, fit_platt, log_loss, sigmoid
from router.learning.learner import guard_verdict, select
from router.policy import Decision, Option, Reason
from router.probe import Probe, load_probe, save_probe

FP = "fingerprint-0"
D = 8


def _probe(weight: np.ndarray, bias: float = 0.0, a: float = 1.0, b: float = 0.0) -> Probe:
    return Probe(mean=np.zeros(D), scale=np.ones(D), weight=np.asarray(weight, dtype=np.float64), bias=bias,
                 platt_a=a, platt_b=b, scorer={"model": "synthetic", "fingerprint": FP, "feature_dim": D},
                 training={"data": "synthetic"})


def _examples(x: np.ndarray, y: np.ndarray, *, backend: str = "cheap", key: str | list[str] = "k1",
              prop: np.ndarray | None = None, start: int = 0, prefix: str = "r") -> list[LabelledExample]:
    out = []
    for i in range(len(y)):
        k = key if isinstance(key, str) else key[i]
        o = Observation.make(id=f"{prefix}{start + i}", at=float(start + i), key=k, backend=backend, chosen=backend,
                             propensity=1.0 if prop is None else float(prop[i]), estimates={backend: 0.5},
                             versions={backend: "v1"}, fingerprint=FP, features=x[i])
        out.append(o.rated(float(y[i]), rated_at=float(start + i)))
    return out


def _world(n: int, rng: np.random.Generator, w_true: np.ndarray, bias: float) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, D))
    y = (rng.random(n) < sigmoid(x @ w_true + bias)).astype(np.float64)
    return x, y


# -- the maths ---------------------------------------------------------------------------------------------------


def test_weighted_auroc_matches_pairs_and_counts_ties_half() -> None:
    y = np.array([1, 0, 1, 0, 1])
    s = np.array([0.9, 0.1, 0.5, 0.5, 0.2])
    w = np.array([1.0, 2.0, 1.0, 1.0, 3.0])
    num = den = 0.0
    for i in np.flatnonzero(y == 1):
        for j in np.flatnonzero(y == 0):
            den += w[i] * w[j]
            num += w[i] * w[j] * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    assert auroc(y, s, w) == pytest.approx(num / den)
    assert np.isnan(auroc(np.ones(3), np.arange(3.0)))


def test_l2_pull_with_no_data_stays_the_prior_and_with_much_data_reaches_the_plain_fit() -> None:
    rng = np.random.default_rng(0)
    prior = rng.normal(size=D)
    empty = fit_logistic(np.zeros((0, D)), np.zeros(0), prior=prior, lam=10.0)
    np.testing.assert_allclose(empty, prior)
    x, y = _world(20000, rng, w_true=np.linspace(-1, 1, D), bias=0.0)
    plain = fit_logistic(x, y, lam=0.0)
    pulled = fit_logistic(x, y, prior=prior, lam=10.0)
    assert np.linalg.norm(pulled - plain) < 0.02 * np.linalg.norm(plain)
    # Few labels: the fit stays near the prior; the distance to it shrinks as λ grows.
    few = slice(0, 30)
    gaps = [np.linalg.norm(fit_logistic(x[few], y[few], prior=prior, lam=lam) - prior) for lam in (1, 10, 100, 1000)]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 0.05 * np.linalg.norm(prior - plain)


def test_ips_weights_make_a_biased_log_describe_the_whole_traffic() -> None:
    """The policy sends a backend mostly the requests it expects it to get right; a misspecified calibration
    fitted on those labels alone describes them, not the traffic. Weighted by 1/propensity it describes the
    traffic (as if fitted on every request)."""
    rng = np.random.default_rng(1)
    n = 40000
    z = rng.normal(0, 2, size=n)
    p_true = 0.5 + 0.45 * np.tanh(z) * (np.abs(z) < 2) + 0.45 * np.sign(z) * (np.abs(z) >= 2) * 0.2  # not logistic
    y = (rng.random(n) < p_true).astype(np.float64)
    logged_p = np.where(z > 0, 0.95, 0.05)  # where the policy sends requests: mostly the easy ones
    logged = rng.random(n) < logged_p
    x = np.zeros((n, D))
    x[:, 0] = z
    examples = _examples(x[logged], y[logged], prop=logged_p[logged])
    settings = LearnerSettings(max_weight=100.0, guard_fraction=0.01)
    batch = select(examples, _probe(np.eye(D)[0]), settings)
    population = fit_platt(z, y)
    weighted = fit_platt(batch.x[:, 0], batch.y, batch.w)
    naive = fit_platt(batch.x[:, 0], batch.y)
    assert np.average(batch.y, weights=batch.w) == pytest.approx(y.mean(), abs=0.02)
    assert abs(np.mean(batch.y) - y.mean()) > 0.1
    assert np.allclose(weighted, population, atol=0.08)
    assert not np.allclose(naive, population, atol=0.15)
    everyone = ece(y, sigmoid(weighted[0] * z + weighted[1]))
    assert everyone < ece(y, sigmoid(naive[0] * z + naive[1]))


def test_recalibration_reduces_ece_on_shifted_data_and_is_promoted() -> None:
    rng = np.random.default_rng(2)
    w_true = np.linspace(-1, 1, D)
    serving = _probe(w_true, bias=1.5)  # trained where successes were much more common
    x, y = _world(3000, rng, w_true, bias=-0.5)  # the traffic it meets
    chosen, outcome = learn("cheap", _examples(x, y), serving, serving, LearnerSettings(kinds=("recalibrate",)))
    assert chosen is not None and outcome.reason == "promoted" and chosen.kind == "recalibrate"
    x_new, y_new = _world(20000, rng, w_true, bias=-0.5)
    before, after = ece(y_new, serving.predict(x_new)), ece(y_new, chosen.probe.predict(x_new))
    assert before > 0.15
    assert after < 0.02
    assert auroc(y_new, chosen.probe.predict(x_new)) == pytest.approx(auroc(y_new, serving.predict(x_new)))


def test_refit_moves_toward_new_weights_and_beats_the_prior_on_held_out_auroc() -> None:
    rng = np.random.default_rng(3)
    w_old = np.linspace(-1, 1, D)
    w_new = w_old.copy()
    w_new[:3] = [1.2, -0.8, 0.9]  # the traffic rewards other directions
    shipped = _probe(w_old)
    x, y = _world(4000, rng, w_new, bias=0.3)
    chosen, outcome = learn("cheap", _examples(x, y), shipped, shipped, LearnerSettings())
    assert chosen is not None and chosen.kind == "refit", outcome.verdicts
    x_new, y_new = _world(20000, rng, w_new, bias=0.3)
    assert auroc(y_new, chosen.probe.predict(x_new)) > auroc(y_new, shipped.predict(x_new)) + 0.03


def test_guard_refuses_a_worse_candidate_and_one_with_too_few_labels() -> None:
    rng = np.random.default_rng(4)
    n = 400
    p = rng.uniform(0.05, 0.95, n)
    y = (rng.random(n) < p).astype(np.float64)
    w, keys = np.ones(n), np.array(["k"] * n, dtype=object)
    settings = LearnerSettings(guard_min_labels=100)
    worse = np.clip(p + rng.normal(0, 0.3, n), 0.01, 0.99)
    assert not guard_verdict(y, w, keys, p, worse, settings).promote
    sharper = np.clip(y * 0.5 + p * 0.5, 0.01, 0.99)  # closer to the truth: it should pass...
    assert guard_verdict(y, w, keys, p, sharper, settings).promote
    few = slice(0, 50)  # ...but not on 50 labels
    verdict = guard_verdict(y[few], w[few], keys[few], p[few], sharper[few], settings)
    assert not verdict.promote and "guard labels" in verdict.reason


def test_a_candidate_needs_min_labels() -> None:
    rng = np.random.default_rng(5)
    x, y = _world(100, rng, np.ones(D), 0.0)
    chosen, outcome = learn("cheap", _examples(x, y), _probe(np.ones(D)), _probe(np.ones(D)),
                            LearnerSettings(min_labels=200))
    assert chosen is None and "min_labels" in outcome.reason


def test_per_key_cap_keeps_each_keys_newest_and_raters_filter() -> None:
    rng = np.random.default_rng(6)
    x, y = _world(600, rng, np.ones(D), 0.0)
    keys = ["loud"] * 500 + ["quiet"] * 50 + ["stranger"] * 50
    batch = select(_examples(x, y, key=keys), _probe(np.ones(D)),
                   LearnerSettings(per_key_cap=100, raters=("loud", "quiet")))
    kept = [e.id for e in batch.examples]
    assert sum(e.key == "loud" for e in batch.examples) == 100
    assert sum(e.key == "quiet" for e in batch.examples) == 50
    assert "r499" in kept and "r399" not in kept and "r400" in kept
    assert batch.dropped == {"not_a_rater": 50, "over_key_cap": 400}


def test_examples_of_another_scorer_are_not_learnt_from() -> None:
    x = np.ones((2, D))
    ok = _examples(x[:1], np.ones(1))
    other = Observation.make(id="o", at=0, key="k", backend="cheap", chosen="cheap", propensity=1, estimates={},
                             versions={}, fingerprint="another", features=x[1]).rated(1, rated_at=0)
    batch = select([*ok, other], _probe(np.ones(D)), LearnerSettings())
    assert len(batch) == 1 and batch.dropped == {"other_scorer": 1}


def test_a_flood_of_wrong_labels_from_one_key_does_not_lower_held_out_auroc(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    w_true = np.linspace(-1, 1, D)
    shipped = _probe(w_true * 0.8 + 0.2, bias=0.0)
    base = save_probe(shipped, tmp_path / "shipped.json")
    registry = Registry(tmp_path / "registry")
    registry.ensure_base("cheap", base)
    x_test, y_test = _world(20000, rng, w_true, 0.0)
    start_auroc = auroc(y_test, shipped.predict(x_test))
    with ExampleStore(tmp_path / "examples.sqlite3") as store:
        learner = Learner(store, registry, LearnerSettings(per_key_cap=300, window=4000), {"cheap": shipped})
        n_honest = 0
        for round_ in range(6):
            x, y = _world(300, rng, w_true, 0.0)
            honest = _examples(x, y, key=[f"honest{i % 3}" for i in range(300)], start=round_ * 10000)
            # The attacker rates ten times as many answers, every one the opposite of the truth.
            xa, ya = _world(3000, rng, w_true, 0.0)
            flood = _examples(xa, 1 - ya, key="attacker", start=round_ * 10000 + 1000, prefix="a")
            store.add(honest + flood)
            n_honest += 300
            learner.run_once()
            _, served = registry.current("cheap")
            assert auroc(y_test, served.predict(x_test)) >= start_auroc - 0.002
    history = registry.history("cheap")
    assert history[0]["event"] == "import"


def test_the_learner_improves_on_honest_labels_and_promotes_versioned_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    w_true = np.linspace(-1, 1, D)
    shipped = _probe(w_true * 0.5 + 0.3, bias=1.0)
    registry = Registry(tmp_path / "registry")
    registry.ensure_base("cheap", save_probe(shipped, tmp_path / "shipped.json"))
    with ExampleStore(tmp_path / "examples.sqlite3") as store:
        x, y = _world(3000, rng, w_true, -0.3)
        store.add(_examples(x, y, key=[f"k{i % 4}" for i in range(3000)]))
        outcome = Learner(store, registry, LearnerSettings(min_keys=2), {"cheap": shipped}).refit("cheap")
    assert outcome.promoted == "v2", outcome.as_dict()
    name, served = registry.current("cheap")
    assert name == "v2"
    loaded = load_probe(registry.path("cheap", "v2"))
    assert loaded.scorer["fingerprint"] == FP
    assert loaded.training["learning"]["parent"] == "v1"
    assert loaded.training["learning"]["kind"] == outcome.kind
    x_new, y_new = _world(20000, rng, w_true, -0.3)
    assert log_loss(y_new, served.predict(x_new)) < log_loss(y_new, shipped.predict(x_new))


# -- the registry ------------------------------------------------------------------------------------------------


def test_registry_promote_rollback_round_trip(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg", clock=lambda: 1000.0)
    shipped = save_probe(_probe(np.ones(D)), tmp_path / "shipped.json")
    assert registry.ensure_base("cheap", shipped) == "v1"
    assert registry.ensure_base("cheap", shipped) == "v1"  # idempotent
    v2 = registry.promote("cheap", _probe(np.ones(D) * 2), {"kind": "refit"})
    v3 = registry.promote("cheap", _probe(np.ones(D) * 3), {"kind": "recalibrate"})
    assert (v2, v3) == ("v2", "v3")
    assert registry.rollback("cheap") == "v2"
    assert registry.current("cheap")[1].weight[0] == 2
    assert registry.rollback("cheap", "v1") == "v1"
    np.testing.assert_allclose(registry.current("cheap")[1].weight, np.ones(D))
    assert registry.promote("cheap", _probe(np.ones(D) * 4), {"kind": "refit"}) == "v4"  # numbers never reused
    assert registry.rollback("cheap", "v3") == "v3"
    versions = registry.versions("cheap")
    assert [v.name for v in versions] == ["v1", "v2", "v3", "v4"]
    assert [v.current for v in versions] == [False, False, True, False]
    for v in versions:
        assert load_probe(v.path).scorer["fingerprint"] == FP
    assert [h["event"] for h in registry.history("cheap")] == ["import", "promote", "promote", "rollback",
                                                                 "rollback", "promote", "rollback"]
    with pytest.raises(RegistryError):
        registry.rollback("cheap", "v9")
    with pytest.raises(RegistryError):
        Registry(tmp_path / "reg").rollback("unknown")


def test_registry_refuses_a_probe_for_another_scorer(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    registry.ensure_base("cheap", save_probe(_probe(np.ones(D)), tmp_path / "a.json"))
    other = Probe(np.zeros(D), np.ones(D), np.ones(D), 0.0, scorer={"fingerprint": "other"})
    with pytest.raises(RegistryError, match="reads scorer"):
        registry.promote("cheap", other, {})
    with pytest.raises(RegistryError, match="reads scorer"):
        registry.ensure_base("cheap", save_probe(other, tmp_path / "b.json"))


# -- the store ---------------------------------------------------------------------------------------------------


def test_store_keeps_examples_across_restarts_bounded_and_rated_once(tmp_path: Path) -> None:
    path = tmp_path / "ex.sqlite3"
    x = np.random.default_rng(9).normal(size=(30, D)).astype(np.float32)
    examples = _examples(x, np.arange(30) % 2)
    with ExampleStore(path, max_rows=20) as store:
        assert store.add(examples[:10]) == 10
        assert store.add(examples[:10]) == 0  # a request is rated once
        store.add(examples[10:])
        assert store.count() == 20
    with ExampleStore(path, max_rows=20) as store:
        got = store.recent("cheap", 5)
        assert [e.id for e in got] == [f"r{i}" for i in range(25, 30)]
        np.testing.assert_allclose(got[-1].observation.vector, x[29], rtol=1e-3, atol=1e-3)
        assert got[-1].label == 1.0 and got[-1].observation.fingerprint == FP
        assert store.recent("cheap", 100, keys=["nobody"]) == []


def test_observation_json_round_trip_and_float16_size() -> None:
    x = np.linspace(-3, 3, 576)
    o = Observation.make(id="a", at=1.0, key="k", backend="b", chosen="c", propensity=0.025,
                         estimates={"b": 0.7, "c": 0.9}, versions={"b": "v2", "c": "v1"}, fingerprint=FP,
                         features=x, text="What is 2+2?", meta={"reason": "explore"})
    assert len(o.features) == 576 * 2
    back = Observation.from_json(o.to_json())
    assert back == o
    with pytest.raises(ValueError):
        Observation.make(id="a", at=1.0, key="k", backend="b", chosen="b", propensity=0.0, estimates={},
                         versions={}, fingerprint=FP, features=x)


# -- exploration -------------------------------------------------------------------------------------------------


def test_exploration_share_propensities_and_allowed_backends() -> None:
    rng = random.Random(0)
    decision = Decision("cheap", Reason.THRESHOLD, ("cheap", "mid", "dear"))
    allowed = {"cheap", "mid"}  # the key may not use "dear"
    counts = {"cheap": 0, "mid": 0, "dear": 0}
    n = 20000
    for _ in range(n):
        e = explore(decision, allowed, 0.05, rng)
        counts[e.decision.backend] += 1
        assert e.propensity == pytest.approx(propensity(e.decision.backend, "cheap", allowed, 0.05))
        if e.explored:
            assert e.decision.reason is Reason.EXPLORE and e.decision.order[0] == "mid"
    assert counts["dear"] == 0
    assert counts["mid"] / n == pytest.approx(0.05, abs=0.006)
    explicit = Decision("dear", Reason.EXPLICIT, ("dear",))
    assert explore(explicit, allowed, 0.2, rng).decision is explicit
    assert explore(decision, {"cheap"}, 0.2, rng).propensity == 1.0
    with pytest.raises(ValueError):
        explore(decision, allowed, 0.5, rng)


# -- the target controller ---------------------------------------------------------------------------------------


def _options(p_cheap: float, p_dear: float) -> list[Option]:
    return [Option("cheap", 0.0001, p_cheap), Option("dear", 0.0004, p_dear)]


def test_entry_follows_the_threshold_policy() -> None:
    options = _options(0.7, 0.9)
    entry = make_entry(TargetKind.DEAR_SHARE, options, fallback="dear", dearer={"dear"}, sent_to="cheap", at=0)
    assert entry.value_at(0.5) == 0.0 and entry.value_at(0.7) == 0.0  # cheap clears (p ≥ t)
    assert entry.value_at(0.8) == 1.0 and entry.value_at(0.95) == 1.0  # the fallback
    cost = make_entry(TargetKind.COST_PER_1K, options, fallback=None, dearer={"dear"}, sent_to="dear", at=0)
    assert cost.value_at(0.95) == pytest.approx(0.4)  # none clears, no fallback: the best estimate
    assert cost.realised == pytest.approx(0.4)


def _stream(n: int, rng: np.random.Generator) -> np.ndarray:
    """Estimates of the cheap backend: GSM8K-like (high) for the first half, MATH-like (lower) after."""
    first = rng.beta(8, 2, n // 2)
    second = rng.beta(3, 2.5, n - n // 2)
    return np.concatenate([first, second])


def test_controller_holds_a_dear_share_across_a_shift() -> None:
    rng = np.random.default_rng(10)
    p = _stream(6000, rng)
    now = [0.0]
    ctl = ThresholdController(TargetKind.DEAR_SHARE, 0.3, initial=0.8, window=1000, min_entries=50,
                              clock=lambda: now[0])
    dear, fixed = [], []
    for i, pc in enumerate(p):
        now[0] = float(i)
        if i % 10 == 0:
            ctl.refresh()
        t = ctl.threshold()
        options = _options(float(pc), 0.95)
        went = "cheap" if pc >= t else "dear"
        dear.append(went == "dear")
        fixed.append(pc < 0.8)
        ctl.observe(make_entry(TargetKind.DEAR_SHARE, options, fallback="dear", dearer={"dear"}, sent_to=went,
                               at=now[0]))
    windows = np.array(dear).reshape(-1, 500).mean(axis=1)
    fixed_windows = np.array(fixed).reshape(-1, 500).mean(axis=1)
    assert np.all(np.abs(windows[1:] - 0.3) <= 0.03), windows
    assert fixed_windows.max() - fixed_windows.min() > 0.3  # what a fixed threshold does meanwhile


def test_controller_window_is_shareable_and_expires_by_the_clock() -> None:
    now = [0.0]
    ctl = ThresholdController("expected_accuracy", 0.8, initial=0.5, window=100, min_entries=1, max_age_s=10,
                              clock=lambda: now[0])
    for i in range(20):
        ctl.observe(make_entry(TargetKind.EXPECTED_ACCURACY, _options(0.6 + i / 100, 0.9), fallback="dear",
                               dearer={"dear"}, sent_to="cheap", at=float(i)))
    now[0] = 19.0
    ctl.refresh()
    other = ThresholdController("expected_accuracy", 0.8, initial=0.5, window=100, clock=lambda: now[0])
    other.load_state(ctl.state())
    assert other.threshold() == ctl.threshold()
    assert [e.to_dict() for e in other.entries()] == [e.to_dict() for e in ctl.entries()]
    assert len(ctl.entries()) == 11  # entries older than 10 s are gone


def test_learner_is_due_after_refit_every_new_ratings(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    shipped = _probe(np.ones(D))
    registry = Registry(tmp_path / "registry")
    registry.ensure_base("cheap", save_probe(shipped, tmp_path / "shipped.json"))
    with ExampleStore(tmp_path / "ex.sqlite3") as store:
        learner = Learner(store, registry, LearnerSettings(refit_every=50), {"cheap": shipped})
        assert not learner.due("cheap") and learner.run_due() == []
        x, y = _world(60, rng, np.ones(D), 0.0)
        store.add(_examples(x, y))
        assert learner.due("cheap")  # a first refit once there are ratings
        assert [o.backend for o in learner.run_due()] == ["cheap"]
        assert not learner.due("cheap")
        x, y = _world(60, rng, np.ones(D), 0.0)
        store.add(_examples(x[:49], y[:49], start=100))
        assert not learner.due("cheap")
        store.add(_examples(x[49:], y[49:], start=200))
        assert learner.due("cheap")


def test_a_probe_reading_text_features_is_refitted_with_its_text_direction(tmp_path: Path) -> None:
    from router import ProbeSet, TextFeatures, prompt_text

    vocab = ("apple", "banana", "cherry", "hard", "easy")
    text = TextFeatures(vocab, np.array([1.0, 1.5, 2.0, 1.2, 1.1]), ngram_max=1, length=True)
    t_dim = text.dim
    w_text = np.array([0.1, -0.2, 0.3, -1.0, 1.0, -0.3])
    anchor = Probe(mean=np.concatenate([np.zeros(D), np.zeros(t_dim - 1), [2.0]]),
                   scale=np.concatenate([np.ones(D), np.ones(t_dim - 1), [0.5]]),
                   weight=np.concatenate([np.linspace(-1, 1, D), w_text]), bias=0.5, platt_a=1.2, platt_b=-0.1,
                   scorer={"fingerprint": FP}, text=text)
    rng = np.random.default_rng(12)
    n = 2000
    x = rng.normal(size=(n, D))
    words_ = [" ".join(rng.choice(vocab, size=rng.integers(1, 6))) for _ in range(n)]
    messages = [[{"role": "user", "content": w}] for w in words_]
    texts = [prompt_text(m) for m in messages]
    dense = text.dense(texts)
    z_true = x @ np.linspace(-1, 1, D) * 0.5 + 2.0 * ((dense - anchor.mean[D:]) / anchor.scale[D:]) @ w_text - 0.5
    y = (rng.random(n) < sigmoid(z_true)).astype(float)
    examples = []
    for i in range(n):
        o = Observation.make(id=f"t{i}", at=i, key="k", backend="b", chosen="b", propensity=1.0, estimates={},
                             versions={}, fingerprint=FP, features=x[i], text=texts[i])
        examples.append(o.rated(y[i], rated_at=i))
    chosen, outcome = learn("b", examples, anchor, anchor, LearnerSettings(kinds=("refit",)))
    assert chosen is not None, outcome.verdicts
    refit = chosen.probe
    alpha = refit.weight[D:] / w_text
    np.testing.assert_allclose(alpha, alpha[0])  # the text direction kept, its scale re-fitted
    assert alpha[0] > 1.3  # the truth leans on the text twice as much as the anchor
    # What the learner scored is what the gateway's ProbeSet computes, after a round trip through the file.
    back = load_probe(save_probe(refit, tmp_path / "refit.json"))
    x32 = x[:50].astype(np.float16).astype(np.float32)
    got = np.array([ProbeSet(["b"], [back]).predict(x32[i], messages[i])["b"] for i in range(50)])
    want = back.predict(np.hstack([x32.astype(np.float64), dense[:50]]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The learner's own view of the logits (sparse text rows) agrees with the probe's dense formula.
    from router.learning.learner import Columns

    batch = select(examples[:50], anchor, LearnerSettings())
    cols = Columns(anchor, batch)
    for probe in (anchor, refit):
        full = np.hstack([batch.x, dense[:50]])
        np.testing.assert_allclose(cols.logits(probe), probe.decision(full), atol=1e-9)


def test_recalibration_after_a_refit_reads_only_ratings_newer_than_the_refit() -> None:
    rng = np.random.default_rng(13)
    x, y = _world(1200, rng, np.ones(D), -0.5)
    examples = _examples(x, y)
    serving = replace(_probe(np.ones(D)), training={"learning": {"kind": "refit", "fitted_to": 1000.0}})
    _, outcome = learn("cheap", examples, serving, _probe(np.ones(D)), LearnerSettings(kinds=("recalibrate",)))
    assert "newer than the serving weights' fit" in outcome.verdicts["recalibrate"]["reason"]  # ~150 after 1000
    serving = replace(serving, training={"learning": {"kind": "refit", "fitted_to": 500.0}})
    _, outcome = learn("cheap", examples, serving, _probe(np.ones(D)), LearnerSettings(kinds=("recalibrate",)))
    n_new = sum(1 for e in examples[501:] if unit_hash(e.id, "guard") >= 0.25)
    assert outcome.verdicts["recalibrate"]["n_fitted"] == n_new


def test_the_guard_wants_a_gain_beyond_its_noise() -> None:
    """Candidates no better than the serving probe (the truth, perturbed) pass a guard of 200 labels by luck alone
    when any gain will do; asking for a gain of one standard error refuses most of them, not a real improvement."""
    rng = np.random.default_rng(14)
    n = 200
    w, keys = np.ones(n), np.array(["k"] * n, dtype=object)
    passed = {0.0: 0, 1.0: 0}
    for _ in range(200):
        p = rng.uniform(0.2, 0.9, n)
        y = (rng.random(n) < p).astype(np.float64)
        noise = np.clip(p + rng.normal(0, 0.05, n), 0.01, 0.99)
        for z in passed:
            passed[z] += guard_verdict(y, w, keys, p, noise, LearnerSettings(guard_z=z)).promote
    assert passed[1.0] <= 0.1 * 200 and passed[1.0] < passed[0.0] / 2
    p = rng.uniform(0.2, 0.9, n)
    y = (rng.random(n) < p).astype(np.float64)
    shifted = sigmoid(np.log(p / (1 - p)) + 0.8)  # the serving probe is too sure of success
    assert guard_verdict(y, w, keys, shifted, p, LearnerSettings(guard_z=1.0)).promote


def test_a_backend_too_rarely_chosen_takes_the_shift_the_others_show(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    w_true = np.linspace(-1, 1, D)
    shipped = {"strong": _probe(w_true, bias=1.0), "weak": _probe(w_true, bias=0.0), "agrees": _probe(w_true, 0.0)}
    registry = Registry(tmp_path / "registry")
    for name, probe in shipped.items():
        registry.ensure_base(name, save_probe(probe, tmp_path / f"{name}.json"))
    with ExampleStore(tmp_path / "ex.sqlite3") as store:
        x, y = _world(2000, rng, w_true, bias=1.0 - 0.8)  # the traffic is harder than the shipped probes think
        store.add(_examples(x, y, backend="strong"))
        x, y = _world(40, rng, w_true, bias=0.0 - 0.8)  # the weak backend's few ratings agree
        store.add(_examples(x, y, backend="weak", prefix="w"))
        x, y = _world(40, rng, w_true, bias=0.0 + 1.5)  # this one's own ratings say the opposite
        store.add(_examples(x, y, backend="agrees", prefix="g"))
        learner = Learner(store, registry, LearnerSettings(kinds=("recalibrate",)), shipped)
        outcomes = {o.backend: o for o in learner.share_shift()}
    assert set(outcomes) == {"weak", "agrees"}
    assert outcomes["weak"].promoted == "v2" and outcomes["weak"].kind == "shared_shift"
    delta = outcomes["weak"].verdicts["shared_shift"]["delta"]
    assert -1.1 < delta < -0.5
    assert registry.current("weak")[1].platt_b == pytest.approx(delta, abs=1e-4)
    assert outcomes["agrees"].promoted is None and "disagree" in outcomes["agrees"].reason
    assert load_probe(registry.current_path("weak")).training["learning"]["donors"] == ["strong"]


def test_each_kind_is_fitted_with_and_without_the_propensity_weights_and_judged_alike() -> None:
    """With ``fit_weights`` (propensity, none) every kind gives two candidates: one fitted on the inverse-propensity
    weights, one on the labels alike. Both are judged on the same guard, weighted by inverse propensity, and the
    promoted one is the passing candidate with the lowest weighted guard log-loss."""
    rng = np.random.default_rng(15)
    w_true = np.linspace(-1, 1, D)
    serving = _probe(w_true, bias=1.5)
    x, y = _world(4000, rng, w_true, bias=-0.5)
    sent = serving.predict(x) > 0.8  # the policy sends this backend what it expects it to get right...
    prop = np.where(sent, 0.97, 0.03)
    logged = sent | (rng.random(len(y)) < 0.03)  # ...and now and then another request, explored
    examples = _examples(x[logged], y[logged], prop=prop[logged])
    chosen, outcome = learn("cheap", examples, serving, serving,
                            LearnerSettings(kinds=("recalibrate",), fit_weights=("propensity", "none")))
    assert set(outcome.verdicts) == {"recalibrate", "recalibrate:unweighted"}
    weighted, alike = outcome.verdicts["recalibrate"], outcome.verdicts["recalibrate:unweighted"]
    assert (weighted["fit_weights"], alike["fit_weights"]) == ("propensity", "none")
    assert weighted["platt"] != alike["platt"]  # the weights matter on a log this skewed
    assert weighted["serving"] == alike["serving"]  # one guard, the same weights, for both
    passing = {k: v["candidate"]["logloss"] for k, v in outcome.verdicts.items() if v["promote"]}
    assert chosen is not None and outcome.kind == min(passing, key=passing.__getitem__)
    _, one = learn("cheap", examples, serving, serving, LearnerSettings(kinds=("recalibrate",)))  # the default
    assert set(one.verdicts) == {"recalibrate"}
    assert one.verdicts["recalibrate"]["platt"] == weighted["platt"]
    with pytest.raises(ValueError, match="fit_weights"):
        LearnerSettings(fit_weights=("uniform",))
