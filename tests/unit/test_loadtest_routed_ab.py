from __future__ import annotations

from loadtest.routed_ab import parse_variant


def test_a_variant_is_a_name_and_its_environment() -> None:
    assert parse_variant("wait2") == ("wait2", {})
    assert parse_variant("w:ROUTER_SCORER__MAX_WAIT_MS=10,ROUTER_SCORER__THREADS=1") == (
        "w", {"ROUTER_SCORER__MAX_WAIT_MS": "10", "ROUTER_SCORER__THREADS": "1"})
    assert parse_variant("eq:A=x=y") == ("eq", {"A": "x=y"})
