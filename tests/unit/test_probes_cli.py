"""``python -m probes`` end to end on a few real questions and the real scorer cut after two layers: extract,
train with a recipe sweep and label sharing, eval (report files) and calibrate (the config's threshold)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from probes.cli import build_parser, main
from probes.data import load_dataset
from router.config import load_settings
from router.probe import ProbeError, load_probe

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache" / "SmolLM2-135M-Instruct"
SMALL, BIG = "Qwen/Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-Math-7B-Instruct"

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="the scorer model is not cached")


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[Path, Path]:
    lines = (ROOT / "data" / "gsm8k_test_qwen25math.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    # enough failures of each model for 2-fold CV: every question the 7B model missed among the first 400, padded
    chosen = [r for r in records[:400] if r["correct"][BIG] == 0][:12] + records[:48]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
scorer:
  model: {MODEL}
  layers: [2]
  pooling: last
  cache_dir: {tmp_path / "cache"}
backends:
  - name: small
    base_url: http://127.0.0.1:9/v1
    model: {SMALL}
    input_cost_per_mtok: 0.1
    output_cost_per_mtok: 0.2
    probe: probes/small.json
  - name: big
    base_url: http://127.0.0.1:9/v1
    model: {BIG}
    input_cost_per_mtok: 0.4
    output_cost_per_mtok: 0.8
    probe: probes/big.json
policy:
  threshold: 0.85   # keep me
""")
    return data, config


def test_every_command_has_help() -> None:
    parser = build_parser()
    for command in ("label", "extract", "train", "eval", "calibrate", "recalibrate"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([command, "--help"])
        assert e.value.code == 0


def test_extract_train_eval_calibrate(workspace, tmp_path: Path, capsys) -> None:
    data, config = workspace
    common = ["--config", str(config), "--data", str(data), "--no-progress"]
    assert main(["extract", *common]) == 0
    assert list((tmp_path / "cache" / "features").glob("*/*.npy"))

    out = tmp_path / "swept"
    code = main(["train", *common, "--folds", "2", "--sweep", "--sweep-layers", "1,2", "--sweep-pooling",
                 "last,mean", "--train-labels", f"big={SMALL}+{BIG}", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sweep chose" in printed
    big = load_probe(out / "big.json")
    assert big.training["trained_on"] == [SMALL, BIG] and big.training["label"] == BIG
    assert len(big.training["sweep"]) == 4
    assert big.scorer["pooling"] in ("last", "mean") and big.weight.shape == (576,)

    # a probe trained for the configured scorer loads against it
    assert main(["train", *common, "--folds", "2"]) == 0
    settings = load_settings(config)
    assert load_probe(settings.backend("small").probe).scorer["layers"] == [2]

    report_dir = tmp_path / "report"
    assert main(["eval", *common, "--folds", "2", "--bootstrap", "20", "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert 0 <= report["backends"]["small"]["auroc"] <= 1
    assert set(report["backends"]["small"]["baselines"]) == {"prompt_length", "tfidf_logreg"}  # own labels only
    assert "reference_paper_probe" in report["backends"]["big"]
    assert report["routing"]["cheap"] == "small" and report["routing"]["dear"] == "big"
    assert 0 <= report["routing"]["apgr"] <= 1.5
    assert (report_dir / "frontier.png").stat().st_size > 1000
    assert "| small | probe |" in (report_dir / "report.md").read_text()
    # what the features depend on is recorded, the prompt cut included
    assert report["scorer"]["max_prompt_tokens"] == settings.scorer.max_prompt_tokens
    assert f"at most {settings.scorer.max_prompt_tokens} prompt tokens" in (report_dir / "report.md").read_text()

    assert main(["calibrate", *common, "--folds", "2", "--max-dear-share", "0.3"]) == 0
    printed = capsys.readouterr().out
    chosen = json.JSONDecoder().raw_decode(printed[printed.index("{"):])[0]
    assert chosen["cheap"] == "small" and chosen["expected_dear_share"] <= 0.3
    # the share per backend is rounded to 4 places, the dear share is not
    assert chosen["expected_share"]["big"] == pytest.approx(chosen["expected_dear_share"], abs=1e-4)
    text = config.read_text()
    assert "# keep me" in text
    assert yaml.safe_load(text)["policy"]["threshold"] == pytest.approx(chosen["threshold"], abs=1e-4)
    # the probes trained above carry a text stage (the scorer has no block before 2 to stop at: no early stage);
    # calibrate chose its margin for the new threshold on the same held-out estimates, and wrote it
    assert "cascade margins for threshold" in printed
    cascade = load_probe(settings.backend("small").probe).cascade
    assert cascade["policy"]["threshold"] == pytest.approx(chosen["threshold"]) and set(cascade["margins"]) == {"text"}
    assert "nested out-of-fold" in cascade["chosen_on"]


def test_train_on_one_file_report_on_another_with_text_features(workspace, tmp_path: Path, capsys) -> None:
    """eval --test, text features and shared labels; train with them and a calibration file; the gateway's
    probe set reads the result; recalibrate re-fits Platt only."""
    from router.probe import ProbeSet

    data, config = workspace
    lines = data.read_text().splitlines()
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(lines[::2]) + "\n")
    test.write_text("\n".join(lines[1::2]) + "\n")
    common = ["--config", str(config), "--no-progress"]
    report_dir = tmp_path / "report"
    assert main(["eval", *common, "--data", str(train), "--test", str(test), "--folds", "2", "--bootstrap", "20",
                 "--text-features", "tfidf+length", "--share-labels", "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["test"]["n"] == len(lines[1::2]) and report["backends"]["small"]["n"] == len(lines[1::2])
    assert report["backends"]["big"]["trained_on"] == [SMALL, BIG] and report["backends"]["big"]["label"] == BIG
    # trained on shared labels, so TF-IDF on the same labels is reported beside TF-IDF on the backend's own
    assert {"tfidf_logreg", "tfidf_logreg_same_labels"} <= set(report["backends"]["big"]["baselines"])
    assert {"routing", "pool"} <= set(report) and "paper_probe" in report["pool"]["policies"]
    assert (report_dir / "pool_frontier.png").stat().st_size > 1000

    out = tmp_path / "probes"
    assert main(["train", *common, "--data", str(train), "--calibration", str(test), "--folds", "2",
                 "--text-features", "tfidf+length", "--share-labels", "all", "--out", str(out)]) == 0
    small, big = load_probe(out / "small.json"), load_probe(out / "big.json")
    assert small.text is not None and small.text.digest == big.text.digest
    # --share-labels all: both trained on every label set the file has, each still judged on its own labels
    assert small.training["trained_on"] == big.training["trained_on"] == load_dataset(train).label_sets()
    assert {SMALL, BIG} <= set(small.training["trained_on"]) and big.training["label"] == BIG
    assert small.metrics["calibration"]["n"] == len(lines[1::2])
    p = ProbeSet(["small", "big"], [small, big]).predict(np.zeros(576), [{"role": "user", "content": "2+2?"}])
    assert set(p) == {"small", "big"} and all(0 < v < 1 for v in p.values())

    again = tmp_path / "again"
    settings_text = config.read_text().replace("probes/small.json", str(out / "small.json")).replace(
        "probes/big.json", str(out / "big.json"))
    config.write_text(settings_text)
    assert main(["recalibrate", *common, "--data", str(test), "--out", str(again)]) == 0
    redone = load_probe(again / "small.json")
    assert np.array_equal(redone.weight, small.weight) and "recalibrated" in redone.metrics


def test_train_fits_the_cascade_stages_and_their_margins(workspace, tmp_path: Path) -> None:
    """train writes version-3 files: a text-only and an early-block model per backend, the margins chosen for the
    config's policy (and for other thresholds), one vocabulary per file; the gateway's probe set reads every
    stage and the early stage's recipe matches a scorer cut at that block."""
    from probes.cascade import THRESHOLD_GRID
    from probes.extract import extract_features
    from router.probe import ProbeSet, check_compatible, check_early_compatible

    data, config = workspace
    out = tmp_path / "probes"
    assert main(["train", "--config", str(config), "--data", str(data), "--no-progress", "--folds", "2",
                 "--early-layer", "1", "--cascade-agreement", "0.9", "--out", str(out)]) == 0
    small, big = load_probe(out / "small.json"), load_probe(out / "big.json")
    doc = json.loads((out / "small.json").read_text())
    assert doc["version"] == 3 and doc["reads_text_features"] is False and set(doc["stages"]) == {"text", "early"}
    assert small.text is None and small.stages["text"].text is not None and small.stages["early"].text is None
    assert small.early_layer == 1 and small.stages["early"].scorer["layers"] == [1]
    cascade = small.cascade
    assert cascade == big.cascade and cascade["backends"] == ["small", "big"] and cascade["agreement"] == 0.9
    assert cascade["policy"] == {"mode": "threshold", "threshold": 0.85, "fallback": None}
    assert set(cascade["margins"]) == {"text", "early"} and cascade["agreement"] <= 1
    assert sum(cascade["decided"].values()) == pytest.approx(1, abs=1e-3)
    assert [e["threshold"] for e in cascade["by_threshold"]] == list(THRESHOLD_GRID)

    settings = load_settings(config)
    scorer_info = extract_features(settings.scorer, load_dataset(data), progress=False)[1].info
    check_compatible(small, scorer_info, "small")
    early_cfg = settings.scorer.model_copy(update={"layers": [1]})
    early_info = extract_features(early_cfg, load_dataset(data), progress=False)[1].info
    check_early_compatible(small, early_info, "small")
    with pytest.raises(ProbeError, match="early stage"):
        check_early_compatible(small, scorer_info, "small")

    probes = ProbeSet(["small", "big"], [small, big])
    assert probes.stages == ("text", "early") and probes.early_layer == 1
    messages = [{"role": "user", "content": "What is 17*23?"}]
    row = probes.text_row(messages)
    text = probes.predict_text(row=row)
    assert text == probes.predict_text(messages) and all(0 < v < 1 for v in text.values())
    x1 = np.zeros(early_info.feature_dim, dtype=np.float32)
    assert set(probes.predict_early(x1, row=row)) == {"small", "big"}
    assert probes.margins() == pytest.approx(cascade["margins"])
    # the stage's own file round trip gives the same estimates as the fitted text model
    assert small.stages["text"].predict(small.stages["text"].text.dense([messages[0]["content"]]))[0] == \
        pytest.approx(text["small"], abs=1e-6)


def test_eval_routes_held_out_questions_by_the_cascade(workspace, tmp_path: Path, capsys) -> None:
    data, config = workspace
    report_dir = tmp_path / "report"
    assert main(["eval", "--config", str(config), "--data", str(data), "--no-progress", "--folds", "2",
                 "--bootstrap", "20", "--cascade", "--early-layer", "1", "--out", str(report_dir)]) == 0
    assert "cascade: decided by text" in capsys.readouterr().out
    cascade = json.loads((report_dir / "report.json").read_text())["cascade"]
    at = cascade["at_policy"]
    assert set(at["decided"]) == {"text", "early", "full"} and sum(at["decided"].values()) == pytest.approx(1, abs=1e-3)
    assert len(at["margins_per_fold"]) == 2 and 0 <= at["agreement"] <= 1
    assert {"cascade", "full", "text_alone", "early_alone"} <= set(at)
    assert set(cascade["frontier"]["apgr"]) >= {"cascade", "full", "full_every_threshold"}
    assert cascade["held_out_auroc"]["small"].keys() == {"text", "early", "full"}
    assert (report_dir / "cascade_frontier.png").stat().st_size > 1000
    assert "## Cascade" in (report_dir / "report.md").read_text()
