"""Guard rails for a first probe: `probes train` and `calibrate` refuse, in their own words and with exit status 1,
a backend with too few successes or failures to learn from (saying how many more questions to label) and one whose
out-of-fold AUROC's interval reaches 0.5; `--force` writes anyway; scikit-learn's warnings stay out.

The scorer is replaced by synthetic features (our own logic under test: counts, intervals, messages, exit
statuses); tests/unit/test_probes_cli.py runs the same commands on the real scorer."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from sklearn.exceptions import ConvergenceWarning

from probes.cli import main
from probes.guards import auroc_check, label_shortfall, min_per_class
from router.probe import load_probe
from router.scorer.recipe import describe
from tests.support.probes import two_backend_config

SMALL, BIG = "small-model", "big-model"
N, D = 120, 16


def test_min_per_class_leaves_two_of_each_outcome_in_every_inner_fold() -> None:
    assert [min_per_class(k) for k in (2, 3, 5, 10)] == [10, 10, 13, 23]
    for k in (3, 5, 10):  # n·(K−1)/K² of the rarer outcome in an inner held-out fold
        assert min_per_class(k) * (k - 1) / k**2 >= 2
    with pytest.raises(ValueError):
        min_per_class(1)


def test_shortfall_says_how_many_more_to_label() -> None:
    y = np.r_[np.ones(3), np.zeros(77)]  # the run: 3 right of 80
    short = label_shortfall("qwen2.5-math-1.5b", y, 5)
    assert short is not None and short.more == 267  # 13 successes at 3 in 80 take 347 questions
    assert short.message().startswith("qwen2.5-math-1.5b: only 3 successes (and 77 failures) of 80 questions: "
                                      "label about 267 more questions to train a probe")
    none = label_shortfall("b", np.zeros(40), 5)
    assert none is not None and "no successes (and 40 failures) of 40 questions: label at least" in none.message()
    assert label_shortfall("b", np.r_[np.ones(13), np.zeros(13)], 5) is None


def test_auroc_check_against_chance() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    assert auroc_check("b", y, y + rng.normal(0, 0.5, 400)).ok
    noise = auroc_check("b", y, rng.random(400))
    assert not noise.ok and noise.low <= 0.5 <= noise.high and "includes 0.5" in noise.message()
    worse = auroc_check("b", y, -y + rng.normal(0, 0.5, 400))
    assert not worse.ok and "below 0.5" in worse.message()


def synthetic(big_failures: int | None) -> tuple[np.ndarray, list[dict]]:
    """Features where the small model's labels are learnable; the big model's are random (``None``: 30% wrong)
    or right but for ``big_failures`` questions."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D))
    small = (x[:, 0] + 0.5 * rng.normal(size=N) > -0.3).astype(int)
    if big_failures is None:
        big = (rng.random(N) > 0.3).astype(int)
    else:
        big = np.ones(N, dtype=int)
        big[rng.choice(N, big_failures, replace=False)] = 0
    records = [{"question": f"Question {i}: what is {i} + {i}?", "answer": str(2 * i),
                "correct": {SMALL: int(small[i]), BIG: int(big[i])}} for i in range(N)]
    return x, records


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(make(big_failures) → data path, config path): the commands read ``synthetic``'s features."""
    features: dict[str, np.ndarray] = {}
    info = describe(model="synthetic", weights_sha256="0" * 64, template=None, layers=[2], pooling="last",
                    final_norm=True, hidden_size=D)
    extractor = SimpleNamespace(info=info, encoder=SimpleNamespace(encode=lambda c: str(c).split()))

    def probe_inputs(cfg, dataset, text, *, scorer=None, progress=True):
        return features[dataset.digest()], extractor

    for module in ("probes.train", "probes.evaluate"):  # modules: the face's `probes.evaluate` is the function
        monkeypatch.setattr(importlib.import_module(module), "probe_inputs", probe_inputs)
    config = tmp_path / "config.yaml"
    config.write_text(two_backend_config(tmp_path, "  fallback: big\n", model="synthetic", small=SMALL, big=BIG,
                                         threshold=0.5))

    def make(big_failures: int | None) -> Path:
        from probes.data import load_dataset

        x, records = synthetic(big_failures)
        data = tmp_path / f"data-{big_failures}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        features[load_dataset(data).digest()] = x
        return data

    return make, config


def sklearn_warnings(recwarn: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in recwarn if issubclass(w.category, UserWarning | ConvergenceWarning)]


def test_too_few_failures_no_probe_a_message_and_exit_1(workspace, tmp_path: Path, capsys, recwarn) -> None:
    make, config = workspace
    data = make(big_failures=3)
    code = main(["train", "--config", str(config), "--data", str(data), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1
    assert (f"big: only 3 failures (and {N - 3} successes) of {N} questions: label about {13 * N // 3 - N} more "
            "questions to train a probe") in err
    assert "No probe written (--force writes it anyway)." in err and "error: no probe written for big" in err
    assert not (tmp_path / "probes" / "big.json").exists()
    assert (tmp_path / "probes" / "small.json").is_file()  # the other backend is not held back
    assert "small: out-of-fold AUROC" in out and "interval" in out
    assert sklearn_warnings(recwarn) == []


def test_force_writes_anyway_without_library_warnings(workspace, tmp_path: Path, capsys, recwarn) -> None:
    make, config = workspace
    data = make(big_failures=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning scikit-learn raises would fail the run
        code = main(["train", "--config", str(config), "--data", str(data), "--no-progress", "--force"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "big: only 3 failures" in err and "Written anyway (--force)." in err
    big = load_probe(tmp_path / "probes" / "big.json")
    assert "only 3 failures" in big.metrics["forced"][0] and big.training["positives"] == N - 3
    assert "least populated" not in out + err
    assert sklearn_warnings(recwarn) == []


def test_auroc_interval_over_half_is_refused_unless_forced(workspace, tmp_path: Path, capsys, recwarn) -> None:
    make, config = workspace
    data = make(big_failures=None)  # enough of each outcome, but unrelated to the features
    code = main(["train", "--config", str(config), "--data", str(data), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "small: out-of-fold AUROC" in out and "big" not in out
    assert "big: out-of-fold AUROC" in err and "includes 0.5 (chance)" in err and "No probe written" in err
    assert not (tmp_path / "probes" / "big.json").exists()
    small = load_probe(tmp_path / "probes" / "small.json")
    assert small.metrics["oof_auroc_ci95"][0] > 0.5 and "forced" not in small.metrics

    assert main(["train", "--config", str(config), "--data", str(data), "--no-progress", "--force"]) == 0
    assert "includes 0.5" in load_probe(tmp_path / "probes" / "big.json").metrics["forced"][0]
    assert "Written anyway (--force)." in capsys.readouterr().err
    assert sklearn_warnings(recwarn) == []


def test_calibrate_refuses_the_same_way(workspace, capsys, recwarn) -> None:
    make, config = workspace
    threshold = lambda: yaml.safe_load(config.read_text())["policy"]["threshold"]  # noqa: E731
    common = ["calibrate", "--config", str(config), "--no-progress", "--max-dear-share", "0.5"]

    assert main([*common, "--data", str(make(big_failures=3))]) == 1
    err = capsys.readouterr().err
    assert "big: only 3 failures" in err and "no threshold chosen or written" in err
    assert threshold() == 0.5

    chance = make(big_failures=None)
    assert main([*common, "--data", str(chance)]) == 1
    out, err = capsys.readouterr()
    assert "big: out-of-fold AUROC" in err and "includes 0.5" in err and "threshold not written" in err
    printed = json.loads(out[out.index("{"):])
    assert printed["auroc"]["big"]["ci95"][0] <= 0.5 < printed["auroc"]["small"]["ci95"][0]
    assert threshold() == 0.5 and "# keep me" in config.read_text()

    assert main([*common, "--data", str(chance), "--force"]) == 0
    assert "(--force)" in capsys.readouterr().out
    assert threshold() != 0.5 and "# keep me" in config.read_text()
    assert sklearn_warnings(recwarn) == []
