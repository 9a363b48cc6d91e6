"""``python -m probes replay`` end to end on a few real questions and the real scorer cut after two layers: probes
trained on some questions, replayed on others; the report's shape, the ratings' honesty, the promoted files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from probes.cli import main
from router.probe import load_probe
from tests.support.probes import BIG_MODEL, REAL_MODEL, SMALL_MODEL, two_backend_config

ROOT = Path(__file__).resolve().parents[2]
MODEL, SMALL, BIG = REAL_MODEL, SMALL_MODEL, BIG_MODEL

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="the scorer model is not cached")


def test_replay_writes_windows_for_both_arms_and_rates_only_the_answering_backend(tmp_path: Path) -> None:
    records = [json.loads(line) for line in (ROOT / "data" / "gsm8k_test_qwen25math.jsonl").read_text().splitlines()]
    misses = [r for r in records[:600] if r["correct"][BIG] == 0]
    train = misses[:14] + records[:60]
    stream = misses[14:30] + records[600:744]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "stream.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stream))
    config = tmp_path / "config.yaml"
    config.write_text(two_backend_config(tmp_path, extra="""\
  fallback: big
learning:
  min_labels: 10
  guard_min_labels: 10
  guard_fraction: 0.3
"""))
    common = ["--config", str(config), "--no-progress"]
    # 74 questions on a tiny test model's block 2 do no better than chance (the guard rails would refuse the probes);
    # the replay only needs probes to start from: --force writes them
    assert main(["train", *common, "--data", str(tmp_path / "train.jsonl"), "--folds", "2",
                 "--train-labels", f"big={SMALL}", "--force"]) == 0
    out = tmp_path / "replay"
    assert main(["replay", *common, "--data", str(tmp_path / "stream.jsonl"), "--out", str(out), "--limit", "120",
                 "--window", "40", "--feedback-rate", "0.8", "--explore", "0.1", "--refit-every", "15",
                 "--after-ratings", "40", "--target", "dear_share=0.4", "--folds", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "replay.png").stat().st_size > 10_000
    for arm in ("static", "learning", "fixed"):
        windows = report[arm]["windows"]
        assert [w["n"] for w in windows] == [40, 40, 40]
        for w in windows:
            assert set(w) >= {"n", "accuracy", "cost", "dear_share", "auroc", "ece"}
            assert set(w["auroc"]) == set(w["ece"]) == {"small", "big"}
        total = report[arm]["total"]
        assert set(total) >= {"accuracy", "cost", "dear_share", "auroc", "ece", "served"}
        # The served figures count the questions each backend answered, and their accuracy is the stream's.
        assert sum(total["served"][n]["n"] for n in ("small", "big")) == total["n"]
        answered = sum(total["served"][n]["n"] * (total["served"][n]["accuracy"] or 0) for n in ("small", "big"))
        assert answered / total["n"] == pytest.approx(total["accuracy"], abs=1e-3)
    assert report["static"]["total"]["explored_share"] == 0
    assert 0 < report["learning"]["total"]["explored_share"] < 0.25
    assert report["after_ratings"]["from_question"] > 40
    assert report["offline_reference"]["heldout_questions"] == 40
    assert set(report["target_check"]) == {"static", "learning", "fixed"}
    # Every stored rating is the label of the backend that answered that question, none other.
    labels = {i: r["correct"] for i, r in enumerate(stream)}
    db = sqlite3.connect(out / "learning-state" / "examples.sqlite3")
    rows = db.execute("SELECT id, backend, label, propensity FROM examples").fetchall()
    assert len(rows) == sum(report["learning"]["ratings"].values())
    model = {"small": SMALL, "big": BIG}
    assert report["questions"] == 120
    stream_rows = report["stream_rows"]
    for rid, backend, label, propensity in rows:
        i = int(rid[1:])
        assert label == labels[stream_rows[i]][model[backend]]
        assert 0 < propensity <= 1
    for promotion in report["learning"]["promotions"]:
        path = out / "learning-state" / "registry" / promotion["backend"] / f"{promotion['version']}.json"
        assert load_probe(path).scorer["fingerprint"] == load_probe(tmp_path / "probes" / "small.json").scorer[
            "fingerprint"]


def test_a_subset_reads_the_whole_files_cached_features(tmp_path: Path, tiny_scorer_cfg) -> None:
    from probes.data import load_dataset
    from probes.extract import extract_features

    rows = [{"question": f"What is {i} plus {i}?", "subject": "easy" if i % 3 else "hard", "correct": {"m": i % 2}}
            for i in range(9)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_scorer_cfg.model_copy(update={"cache_dir": tmp_path / "cache"})
    full = load_dataset(path)
    features, _ = extract_features(cfg, full, progress=False)
    hard = full.where({"subject": ["hard"]})
    assert hard.rows == (0, 3, 6) and [r["question"] for r in hard.records] == [rows[i]["question"] for i in (0, 3, 6)]
    sub, _ = extract_features(cfg, hard, progress=False)
    assert (sub == features[[0, 3, 6]]).all()
    assert len(list((tmp_path / "cache" / "features").glob("*/*.npy"))) == 1  # nothing extracted again
    assert hard.subset([1]).rows == (3,)
