"""The learning settings in the config (policy.explore, policy.target, learning) and ``python -m router probes``
(list, promote, rollback, refit) on a registry of synthetic probes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.cli import main
from router.config import ConfigError, load_settings
from router.learning import ExampleStore, Observation, Registry
from router.learning.fitting import sigmoid
from router.probe import Probe, load_probe, save_probe

D = 6
SCORER = {"model": "synthetic", "fingerprint": "fp-1", "feature_dim": D, "layers": [1], "pooling": "last"}


def _probe(weight: np.ndarray, bias: float = 0.0) -> Probe:
    return Probe(np.zeros(D), np.ones(D), np.asarray(weight, dtype=np.float64), bias, scorer=SCORER,
                 training={"data": "synthetic"})


def _config(tmp_path: Path, extra: str = "") -> Path:
    probes = tmp_path / "probes"
    save_probe(_probe(np.full(D, 0.2), 1.5), probes / "cheap.json")
    save_probe(_probe(np.full(D, 0.1), 2.0), probes / "dear.json")
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
backends:
  - name: cheap
    base_url: http://127.0.0.1:9/v1
    model: m-cheap
    input_cost_per_mtok: 0.1
    output_cost_per_mtok: 0.2
    probe: probes/cheap.json
  - name: dear
    base_url: http://127.0.0.1:9/v1
    model: m-dear
    input_cost_per_mtok: 0.4
    output_cost_per_mtok: 0.8
    probe: probes/dear.json
learning:
  enabled: true
  store: state/examples.sqlite3
  registry: state/registry
  min_labels: 100
  guard_min_labels: 50
{extra}""")
    return config


def test_learning_paths_resolve_against_the_config_and_defaults_hold(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path))
    assert settings.learning.store == (tmp_path / "state" / "examples.sqlite3").resolve()
    assert settings.learning.registry == (tmp_path / "state" / "registry").resolve()
    assert settings.policy.explore == 0.0 and settings.policy.target is None


@pytest.mark.parametrize(("extra", "message"), [
    ("policy:\n  explore: 0.3\n", "policy.explore"),
    ("policy:\n  mode: utility\n  target: {kind: dear_share, value: 0.5}\n", "needs policy.mode 'threshold'"),
    ("policy:\n  target: {kind: dear_share, value: 1.5}\n", "in [0, 1]"),
    ("policy:\n  target: {kind: share, value: 0.5}\n", "policy.target.kind"),
    ("auth:\n  keys: [{name: alice, key: sk-a}]\nlearning2: 1\n", "learning2"),
])
def test_invalid_learning_settings_name_the_field(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(_config(tmp_path, extra))


def test_raters_must_name_keys(tmp_path: Path) -> None:
    config = _config(tmp_path, "  raters: [alice, mallory]\nauth:\n  keys: [{name: alice, key: sk-a}]\n")
    with pytest.raises(ConfigError, match="mallory names no key"):
        load_settings(config)
    ok = _config(tmp_path, "  raters: [alice, anonymous]\nauth:\n  keys: [{name: alice, key: sk-a}]\n")
    assert load_settings(ok).learning.raters == ["alice", "anonymous"]


def test_enabled_learning_needs_its_files(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(_config(tmp_path).read_text().replace("  store: state/examples.sqlite3\n", ""))
    with pytest.raises(ConfigError, match=r"needs learning\.store"):
        load_settings(config)


def test_router_probes_refit_list_promote_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, D))
    y = (rng.random(1200) < sigmoid(x @ np.full(D, 0.2) - 0.5)).astype(float)  # harder than the probe thinks
    with ExampleStore(tmp_path / "state" / "examples.sqlite3") as store:
        store.add(Observation.make(id=f"r{i}", at=i, key="anonymous", backend="cheap", chosen="cheap",
                                   propensity=1.0, estimates={}, versions={}, fingerprint="fp-1",
                                   features=x[i]).rated(y[i], rated_at=i) for i in range(1200))
    assert main(["probes", "refit", "--config", str(config)]) == 0
    outcomes = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {o["backend"]: o["promoted"] for o in outcomes} == {"cheap": "v2", "dear": None}
    assert main(["probes", "list", "--config", str(config)]) == 0
    listed = capsys.readouterr().out
    assert "* v2:" in listed and "from v1" in listed and "imported" in listed

    offline = save_probe(_probe(np.full(D, 0.3)), tmp_path / "offline.json")
    assert main(["probes", "promote", "--config", str(config), "cheap", "--probe", str(offline)]) == 0
    registry = Registry(tmp_path / "state" / "registry")
    assert registry.current_name("cheap") == "v3"
    assert load_probe(registry.current_path("cheap")).training["learning"]["kind"] == "manual"

    assert main(["probes", "rollback", "--config", str(config), "cheap", "--to", "v1"]) == 0
    assert "serving v1 (was v3)" in capsys.readouterr().out
    np.testing.assert_allclose(registry.current("cheap")[1].weight, np.full(D, 0.2))
    assert main(["probes", "rollback", "--config", str(config), "cheap", "--to", "v7"]) == 2
    assert "no version v7" in capsys.readouterr().err

    other = Probe(np.zeros(D), np.ones(D), np.ones(D), 0.0, scorer=SCORER | {"fingerprint": "fp-2"})
    assert main(["probes", "promote", "--config", str(config), "cheap", "--probe",
                 str(save_probe(other, tmp_path / "other.json"))]) == 2
    assert "reads scorer fp-2" in capsys.readouterr().err
