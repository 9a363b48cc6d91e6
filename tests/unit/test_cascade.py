"""The cascade's decision side: probe files with stages (version 3) round trip and old files still load; the
text-only stage gives the gateway the estimate training computed; the margin chooser keeps the cascade's
decisions the full probes' on the stated share of rows, at the least compute."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.cascade import (
    THRESHOLD_GRID,
    MarginChoice,
    TextOnly,
    cascade_block,
    choose_margins,
    decisions,
    disagreement_budget,
    route,
    stage_curve,
)
from probes.fit import Inputs, fit_text_features
from router import Probe, ProbeError, ProbeSet, check_compatible, load_probe, save_probe, scorer_block
from router.policy import Option, Rule, choose
from router.probe import cascade_margins, check_early_compatible
from router.scorer.recipe import ScorerInfo
from router.text_features import prompt_text
from tests.support.probes import TEXTS

INFO = ScorerInfo(model="m", layers=(4,), pooling="last", final_norm=True, hidden_size=2, feature_dim=2,
                  fingerprint="full")
EARLY = ScorerInfo(model="m", layers=(2,), pooling="last", final_norm=True, hidden_size=2, feature_dim=2,
                   fingerprint="early")
MESSAGES = [{"role": "user", "content": "A train travels 60 miles per hour, step by step."}]


def _probe(seed: int, *, text_in_full: bool = False) -> Probe:
    """A full probe (activations, optionally text) with a text stage and an early stage."""
    rng = np.random.default_rng(seed)
    text = fit_text_features(TEXTS, min_df=1)
    full_dim = 2 + (text.dim if text_in_full else 0)
    full = Probe(rng.normal(size=full_dim), rng.uniform(0.5, 2, full_dim), rng.normal(size=full_dim), 0.2, 1.1,
                 -0.1, scorer_block(INFO), text=text if text_in_full else None)
    stage_text = Probe(np.zeros(text.dim), np.ones(text.dim), rng.normal(size=text.dim), -0.3, 0.9, 0.2, text=text)
    early = Probe(np.array([0.5, -1.0]), np.array([2.0, 0.5]), rng.normal(size=2), 0.4, 1.3, 0.05,
                  scorer_block(EARLY), training={"C": 0.01}, metrics={"inner_oof_auroc": 0.7})
    block = {"margins": {"text": 0.1, "early": 0.05}, "policy": {"mode": "threshold", "threshold": 0.8},
             "by_threshold": [{"threshold": 0.7, "margins": {"text": 0.2, "early": 0.01}},
                              {"threshold": 0.75, "margins": {"text": 0.12, "early": 0.03}},
                              {"threshold": 0.8, "margins": {"text": 0.1, "early": 0.05}}]}
    return Probe(full.mean, full.scale, full.weight, full.bias, full.platt_a, full.platt_b, full.scorer,
                 text=full.text, stages={"text": stage_text, "early": early}, cascade=block)


def _dense(probe: Probe, activations: np.ndarray, messages: list[dict[str, str]]) -> np.ndarray:
    parts = [activations] + ([probe.text.dense([prompt_text(messages)])[0]] if probe.text is not None else [])
    return np.concatenate(parts)[None]


@pytest.mark.parametrize("text_in_full", [False, True])
def test_a_probe_with_stages_round_trips(tmp_path: Path, text_in_full: bool) -> None:
    probe = _probe(0, text_in_full=text_in_full)
    path = save_probe(probe, tmp_path / "p.json")
    doc = json.loads(path.read_text())
    assert doc["version"] == 3 and doc["reads_text_features"] is text_in_full
    assert doc["stages"]["text"]["reads_text_features"] and not doc["stages"]["early"]["reads_text_features"]
    assert doc["stages"]["early"]["scorer"]["fingerprint"] == "early" and doc["stages"]["text"]["scorer"] is None
    assert len(doc["text_features"]["vocabulary"]) == len(probe.stages["text"].text.vocabulary)  # once a file
    loaded = load_probe(path)
    check_compatible(loaded, INFO, "p")
    check_early_compatible(loaded, EARLY, "p")
    assert (loaded.text is not None) is text_in_full and loaded.early_layer == 2
    assert loaded.cascade == probe.cascade and loaded.stages["early"].metrics == {"inner_oof_auroc": 0.7}
    x, x_early = np.array([0.3, -1.2]), np.array([1.5, 0.2])
    assert loaded.predict(_dense(loaded, x, MESSAGES)) == pytest.approx(probe.predict(_dense(probe, x, MESSAGES)))
    for name, features in (("early", x_early[None]),
                           ("text", probe.stages["text"].text.dense([prompt_text(MESSAGES)]))):
        # stored with the standardisation folded in: the same estimates
        assert loaded.stages[name].predict(features) == pytest.approx(probe.stages[name].predict(features))


def test_files_of_earlier_versions_still_load(tmp_path: Path) -> None:
    text = fit_text_features(TEXTS, min_df=1)
    plain = Probe(np.zeros(2), np.ones(2), np.array([0.4, 0.1]), 0.3, scorer=scorer_block(INFO))
    joint = Probe(np.zeros(2 + text.dim), np.ones(2 + text.dim), np.full(2 + text.dim, 0.1), 0.0,
                  scorer=scorer_block(INFO), text=text)
    for probe, version in ((plain, 1), (joint, 2)):
        path = save_probe(probe, tmp_path / f"v{version}.json")
        doc = json.loads(path.read_text())
        assert doc["version"] == version and "stages" not in doc and "reads_text_features" not in doc
        loaded = load_probe(path)
        assert loaded.stages == {} and loaded.cascade == {} and (loaded.text is not None) == (version == 2)
        probes = ProbeSet(["a"], [loaded])
        assert probes.stages == () and probes.margins() == {}
        with pytest.raises(ProbeError, match="text stage"):
            probes.predict_text(MESSAGES)
        with pytest.raises(ProbeError, match="no early stage"):
            check_early_compatible(loaded, EARLY, "a")


def test_the_probe_set_scores_every_stage_from_one_text_row() -> None:
    a, b = _probe(1), _probe(2, text_in_full=True)
    probes = ProbeSet(["a", "b"], [a, b])
    assert probes.stages == ("text", "early") and probes.early_layer == 2
    row = probes.text_row(MESSAGES)
    x, x_early = np.array([0.3, -1.2]), np.array([1.5, 0.2])
    dense_text = a.stages["text"].text.dense([prompt_text(MESSAGES)])
    got = probes.predict_text(row=row)
    assert got == probes.predict_text(MESSAGES)
    for name, probe in (("a", a), ("b", b)):
        assert got[name] == pytest.approx(float(probe.stages["text"].predict(dense_text)[0]), abs=1e-6)
        assert probes.predict_early(x_early, row=row)[name] == pytest.approx(
            float(probe.stages["early"].predict(x_early[None])[0]), abs=1e-6)
        assert probes.predict(x, row=row)[name] == pytest.approx(
            float(probe.predict(_dense(probe, x, MESSAGES))[0]), abs=1e-5)


def test_a_stage_missing_from_one_probe_is_missing_from_the_set() -> None:
    a, b = _probe(1), _probe(2)
    b = Probe(b.mean, b.scale, b.weight, b.bias, scorer=b.scorer, stages={"text": b.stages["text"]})
    probes = ProbeSet(["a", "b"], [a, b])
    assert probes.stages == ("text",) and probes.early_layer is None
    assert set(probes.margins()) == {"text"}
    with pytest.raises(ProbeError, match="early stage"):
        probes.predict_early(np.zeros(2))


def test_a_file_holds_one_vocabulary(tmp_path: Path) -> None:
    probe = _probe(0)
    other = fit_text_features(TEXTS[:3], min_df=1)
    stage = probe.stages["text"]
    odd = Probe(np.zeros(other.dim), np.ones(other.dim), np.zeros(other.dim), 0.0, text=other)
    with pytest.raises(ProbeError, match="same text features"):
        save_probe(Probe(probe.mean, probe.scale, probe.weight, 0.0, stages={"text": stage, "other": odd}),
                   tmp_path / "p.json")


@pytest.mark.parametrize("edit", [
    lambda d: d["stages"]["text"].pop("bias"),
    lambda d: d["stages"]["early"].update(reads_text_features=True) or d.pop("text_features"),
    lambda d: d.update(tensors="gone.safetensors"),
])
def test_malformed_stages_are_refused(tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = save_probe(_probe(0), tmp_path / "p.json")
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ProbeError, match="malformed"):
        load_probe(path)


def test_an_early_stage_for_another_block_is_refused(tmp_path: Path) -> None:
    loaded = load_probe(save_probe(_probe(0), tmp_path / "p.json"))
    with pytest.raises(ProbeError, match=r"early stage.*fingerprint"):
        check_early_compatible(loaded, INFO, "backend x")
    with pytest.raises(ProbeError, match="cannot stop"):
        check_early_compatible(loaded, None, "backend x")


def test_margins_for_a_moved_threshold_come_from_the_nearest_chosen_on_either_side() -> None:
    block = _probe(0).cascade
    assert cascade_margins(block) == {"text": 0.1, "early": 0.05}
    assert cascade_margins(block, 0.8) == {"text": 0.1, "early": 0.05}
    assert cascade_margins(block, 0.72) == {"text": 0.2, "early": 0.03}  # the larger of 0.70's and 0.75's
    assert cascade_margins(block, 0.75) == {"text": 0.12, "early": 0.03}
    assert cascade_margins(block, 0.95) == {"text": 0.1, "early": 0.05}  # beyond the table: its last entry
    assert cascade_margins({"margins": {"text": 0.1, "early": None}}) == {"text": 0.1}


def test_the_text_stage_gives_the_gateway_the_estimate_training_computed() -> None:
    rng = np.random.default_rng(0)
    n = 300
    hard = rng.uniform(size=n) < 0.5
    texts = tuple(("a tricky puzzle about " if h else "a plain sum about ") + f"item {i % 7}" + " word" * (i % 5)
                  for i, h in enumerate(hard))
    y = (rng.uniform(size=n) < np.where(hard, 0.3, 0.8)).astype(np.int64)
    fitted = TextOnly().fit_calibrated(Inputs(np.zeros((n, 0)), texts), [y], y, folds=3, seed=0)
    assert fitted.inner_probability.shape == (n,)
    from probes.metrics import auroc

    assert auroc(y, fitted.inner_probability) > 0.65
    probe = fitted.scorer.probe()
    probe = Probe(probe.mean, probe.scale, probe.weight, probe.bias, fitted.a, fitted.b, text=probe.text)
    full = Probe(np.zeros(2), np.ones(2), np.zeros(2), 0.0, stages={"text": probe})
    got = ProbeSet(["a"], [full]).predict_text([{"role": "user", "content": texts[3]}])["a"]
    assert got == pytest.approx(float(fitted.probability([texts[3]])[0]), abs=1e-9)


# --- choosing the margins ------------------------------------------------------------------------------------


def test_a_single_stage_margin_is_the_smallest_that_meets_the_agreement() -> None:
    full = np.zeros(10, dtype=np.int64)
    decision = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    radius = np.array([0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.3, 0.2, 0.01, 0.0])
    stages = {"text": (decision, radius)}

    def exact(agreement: float) -> MarginChoice:  # the budget without its margin of safety: e ≤ (1 − agreement)·n
        return choose_margins(full, stages, agreement=agreement, confidence_z=0.0)

    assert exact(0.7).margins == {"text": 0.0}  # 3 wrong of 10 are allowed
    got = exact(0.8)  # 2 allowed: only the one at 0.01 must wait
    assert got.margins == {"text": 0.01} and got.agreement == pytest.approx(0.8) and got.decided["text"] == 0.8
    got = exact(0.9)  # 1 allowed: the ones at 0.2 and below wait
    assert got.margins == {"text": 0.2} and got.agreement == pytest.approx(0.9)
    assert got.decided == {"text": 0.4, "full": 0.6} and got.compute == pytest.approx(0.6)
    got = exact(1.0)
    assert got.margins == {"text": 0.3} and got.agreement == 1.0 and got.decided["text"] == 0.2
    # by default the budget keeps a one-sided 95% bound within it: of 10 rows at 0.7, 1 wrong (1 + 1.645 ≤ 3), not 3
    got = choose_margins(full, stages, agreement=0.7)
    assert got.margins == {"text": 0.2} and got.agreement == pytest.approx(0.9)
    assert [c["margin"] for c in stage_curve(full, decision, radius, (0.7, 1.0))] == [0.2, 0.3]


@pytest.mark.parametrize(("agreement", "n", "z", "budget"), [
    (0.99, 1000, 0.0, 10), (0.99, 1000, 1.645, 5),  # 5 + 1.645·√5 = 8.7 ≤ 10 < 6 + 1.645·√6
    (0.99, 5978, 1.645, 48), (0.99, 100, 1.645, 0), (1.0, 500, 1.645, 0), (0.5, 4, 0.0, 2),
])
def test_the_disagreement_budget_keeps_its_bound_within_the_agreement(agreement: float, n: int, z: float,
                                                                      budget: int) -> None:
    got = disagreement_budget(agreement, n, z)
    allowed = (1 - agreement) * n
    assert got + z * math.sqrt(got) <= allowed + 1e-9 < (got + 1) + z * math.sqrt(got + 1)  # the largest such
    assert got == budget


@settings(max_examples=100, deadline=None)
@given(st.floats(0.8, 1.0), st.integers(1, 20_000), st.floats(0.0, 3.0))
def test_a_wider_bound_never_allows_more_disagreements(agreement: float, n: int, z: float) -> None:
    assert disagreement_budget(agreement, n, z) <= disagreement_budget(agreement, n, 0.0)
    assert disagreement_budget(agreement, n, z) >= disagreement_budget(agreement, n, z + 0.5)


def test_route_lets_each_stage_decide_where_its_radius_exceeds_its_margin() -> None:
    full = np.array([2, 2, 2, 2])
    stages = {"text": (np.array([0, 0, 1, 1]), np.array([0.3, 0.1, 0.0, 0.0])),
              "early": (np.array([1, 1, 1, 1]), np.array([0.0, 0.2, 0.05, 0.0]))}
    choice, by = route(full, stages, {"text": 0.2, "early": 0.1})
    assert choice.tolist() == [0, 1, 2, 2] and by.tolist() == [0, 1, 2, 2]
    choice, by = route(full, stages, {"text": None, "early": 0.0})  # no text margin: stage off; 0: decides all
    assert choice.tolist() == [1, 1, 1, 1] and by.tolist() == [1, 1, 1, 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.9, 0.95, 0.99]), st.floats(0.1, 0.6), st.sampled_from([0.0, 1.645]))
def test_two_margins_meet_the_agreement_at_the_least_compute(seed: int, agreement: float, early_cost: float,
                                                             z: float) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    full = rng.integers(0, 3, n)
    radius1, radius2 = np.round(rng.uniform(0, 0.3, n), 2), np.round(rng.uniform(0, 0.3, n), 2)
    # wrong mostly where the radius is small
    wrong1 = rng.uniform(size=n) < 0.5 * (radius1 < 0.1) + 0.02
    wrong2 = rng.uniform(size=n) < 0.3 * (radius2 < 0.05) + 0.01
    stages = {"text": (np.where(wrong1, (full + 1) % 3, full), radius1),
              "early": (np.where(wrong2, (full + 2) % 3, full), radius2)}
    cost = {"text": 0.0, "early": early_cost}
    got = choose_margins(full, stages, agreement=agreement, cost=cost, confidence_z=z)
    budget = disagreement_budget(agreement, n, z)
    choice, by = route(full, stages, got.margins)
    assert got.agreement == pytest.approx(np.mean(choice == full)) and np.sum(choice != full) <= budget
    assert got.agreement >= agreement - 1e-12
    assert got.compute == pytest.approx(np.mean(by == 1) * early_cost + np.mean(by == 2))
    # no pair of margins on the grid of radii within the budget does better
    for m1, m2 in itertools.product(np.unique(np.concatenate([[0.0], radius1])),
                                    np.unique(np.concatenate([[0.0], radius2]))):
        choice, by = route(full, stages, {"text": m1, "early": m2})
        if np.sum(choice != full) <= budget:
            assert np.mean(by == 1) * early_cost + np.mean(by == 2) >= got.compute - 1e-9


def test_the_cascade_block_records_the_policy_and_every_threshold() -> None:
    rng = np.random.default_rng(0)
    n = 400
    truth = rng.uniform(0.3, 1.0, size=(n, 2))
    p = {"full": truth, "early": np.clip(truth + rng.normal(0, 0.03, (n, 2)), 0, 1),
         "text": np.clip(truth + rng.normal(0, 0.08, (n, 2)), 0, 1)}
    cost = np.tile([1.0, 4.0], (n, 1))
    rule = Rule("threshold", 0.8, fallback="dear")
    block = cascade_block(p, cost, ["cheap", "dear"], rule, agreement=0.95, compute={"early": 0.4}, data="d.jsonl")
    assert block["policy"] == {"mode": "threshold", "threshold": 0.8, "fallback": "dear"}
    assert block["agreement_target"] == 0.95 and block["n"] == n and "d.jsonl" in block["chosen_on"]
    # reached on the rows chosen on, with the budget's bound: at most e wrong where e + 1.645·√e ≤ 5% of them
    assert 1 - block["agreement"] <= disagreement_budget(0.95, n) / n + 1e-4 and block["confidence_z"] == 1.645
    assert block["margins"]["text"] > 0 and sum(block["decided"].values()) == pytest.approx(1, abs=1e-3)
    assert [e["threshold"] for e in block["by_threshold"]] == list(THRESHOLD_GRID)
    at = next(e for e in block["by_threshold"] if e["threshold"] == 0.8)
    assert at["margins"] == block["margins"]
    assert [c["agreement"] for c in block["curves"]["text"]] == [0.95, 0.98, 0.99, 0.995, 0.999]
    margins = [c["margin"] for c in block["curves"]["text"]]
    assert margins == sorted(margins)  # more agreement, wider margins
    # utility mode: no table by threshold
    block = cascade_block(p, cost, ["cheap", "dear"], Rule("utility", cost_weight=0.2), agreement=0.95)
    assert "by_threshold" not in block and block["policy"]["mode"] == "utility"


def test_decisions_are_the_policy_per_row() -> None:
    p = np.array([[0.9, 0.95], [0.5, 0.97], [0.79, 0.2]])
    cost = np.tile([1.0, 4.0], (3, 1))
    for rule in (Rule("threshold", 0.8, fallback="dear"), Rule("utility", cost_weight=0.3, fallback="cheap",
                                                                margin=0.05)):
        choice, radius = decisions(p, cost, ["cheap", "dear"], rule)
        for i in range(3):
            options = [Option(n, float(cost[i, j]), float(p[i, j])) for j, n in enumerate(["cheap", "dear"])]
            assert ["cheap", "dear"][choice[i]] == choose(options, rule).backend
            assert math.isfinite(radius[i])


def test_accuracy_at_equal_cost_reads_the_full_probes_upper_envelope() -> None:
    from probes.cascade_eval import accuracy_at_equal_cost
    from probes.pool import Points

    def pts(cost: list[float], acc: list[float]) -> Points:
        return Points(np.arange(len(cost), dtype=float), np.array(acc), np.array(cost), np.zeros((len(cost), 2)))

    full = pts([1.0, 2.0, 3.0, 2.5], [0.80, 0.90, 0.95, 0.85])  # (2.5, 0.85) lies under the envelope
    cascade = pts([1.5, 2.5, 4.0], [0.84, 0.92, 0.99])  # the last costs more than any full point: left out
    got = accuracy_at_equal_cost(cascade, full)
    # envelope at 1.5: 0.85; at 2.5: between (2.0, 0.90) and (2.5, 0.90) → 0.90
    assert got == {"mean": pytest.approx((-0.01 + 0.02) / 2), "worst": pytest.approx(-0.01), "points": 2}
    assert accuracy_at_equal_cost(pts([9.0], [1.0]), full)["points"] == 0
