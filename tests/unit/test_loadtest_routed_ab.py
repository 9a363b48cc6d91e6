from __future__ import annotations

from pathlib import Path

from loadtest.routed_ab import parse_variant
from loadtest.run import ROOT

DEFAULT = ROOT / "config.yaml"


def test_a_variant_is_a_name_its_config_and_its_environment() -> None:
    assert parse_variant("wait2") == ("wait2", DEFAULT, {})
    assert parse_variant("w:ROUTER_SCORER__MAX_WAIT_MS=10,ROUTER_SCORER__THREADS=1") == (
        "w", DEFAULT, {"ROUTER_SCORER__MAX_WAIT_MS": "10", "ROUTER_SCORER__THREADS": "1"})
    assert parse_variant("eq:A=x=y") == ("eq", DEFAULT, {"A": "x=y"})
    assert parse_variant("pool=examples/math-pool.yaml:A=1") == ("pool", Path("examples/math-pool.yaml"), {"A": "1"})
