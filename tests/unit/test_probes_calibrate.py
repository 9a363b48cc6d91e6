"""Choosing the gateway threshold on out-of-fold estimates, and writing it into the YAML."""

import numpy as np
import pytest
import yaml

from probes.calibrate import choose_threshold, set_threshold, write_threshold
from probes.metrics import routing_frontier


def frontier():
    # accuracy by share of dear calls 0, .25, .5, .75, 1: .5, .75, .5, .75, .75 at cost 1 … 3 (see test_probes_metrics)
    return routing_frontier(np.array([0.9, 0.2, 0.5, 0.7]), np.array([1, 0, 1, 0]), np.array([1, 1, 0, 1]), 1.0, 3.0)


def test_min_accuracy_takes_the_cheapest_point() -> None:
    c = choose_threshold(frontier(), min_accuracy=0.75)
    assert c.met and c.threshold == pytest.approx(0.35)
    assert (c.accuracy, c.cost, c.dear_share) == pytest.approx((0.75, 1.5, 0.25))


def test_min_accuracy_out_of_reach_takes_the_most_accurate() -> None:
    c = choose_threshold(frontier(), min_accuracy=0.9)
    assert not c.met and c.accuracy == pytest.approx(0.75) and c.threshold == pytest.approx(0.35)


def test_max_cost_and_max_dear_share() -> None:
    assert choose_threshold(frontier(), max_cost=1.2).threshold == pytest.approx(0.0)
    assert choose_threshold(frontier(), max_cost=2.2).threshold == pytest.approx(0.35)
    assert choose_threshold(frontier(), max_dear_share=0.6).dear_share == pytest.approx(0.25)
    assert choose_threshold(frontier(), max_dear_share=1.0).accuracy == pytest.approx(0.75)
    with pytest.raises(ValueError):
        choose_threshold(frontier(), max_cost=1.0, min_accuracy=0.5)


CONFIG = """\
scorer:
  layers: [15]
policy:
  threshold: 0.85                # route to the cheap model when its estimate is at least this
  alias: router                  # clients ask for model "router"
server:
  threshold: 3                   # not the policy's
"""


def test_set_threshold_keeps_comments_and_other_keys(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    write_threshold(path, 0.73214)
    text = path.read_text()
    assert "  threshold: 0.7321              # route to the cheap model when its estimate is at least this\n" in text
    assert "  threshold: 3                   # not the policy's\n" in text
    data = yaml.safe_load(text)
    assert data["policy"]["threshold"] == pytest.approx(0.7321)
    assert data["server"]["threshold"] == 3
    assert text.replace("0.7321 ", "0.85   ") == CONFIG


def test_set_threshold_adds_a_missing_line() -> None:
    assert yaml.safe_load(set_threshold("policy:\n  alias: r\n", 0.5))["policy"] == {"threshold": 0.5, "alias": "r"}
    assert yaml.safe_load(set_threshold("scorer: {}\n", 1.0))["policy"] == {"threshold": 1.0}
    assert set_threshold("policy:\n  threshold: ${T:-0.8647}  # note\n", 0.9) == \
        "policy:\n  threshold: ${T:-0.9}     # note\n"  # the variable still overrides; only its default changes
