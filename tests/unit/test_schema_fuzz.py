"""Schemathesis against the gateway's own OpenAPI schema: generated requests, valid and not, never get a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from tests.support.servers import FakeBackend, serve
from tests.support.stack import make_settings, running_gateway

MODELS = ["router", "small", "org/large", "no-such-model"]


def with_known_model(pair: tuple[schemathesis.Case, str]) -> schemathesis.Case:
    """Most generated model names are unknown (a 404); name real ones so requests reach the backends too."""
    case, model = pair
    case.body["model"] = model
    return case


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(mode: schemathesis.GenerationMode, tmp_path: Path,
                                                  tiny_scorer_cfg: ScorerConfig,
                                                  tiny_extractor: FeatureExtractor) -> None:
    small, large = FakeBackend("org/small"), FakeBackend("org/large")
    with serve(small.app) as small_url, serve(large.app) as large_url:
        cfg = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url)
        with running_gateway(cfg) as url:
            schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
            operations = [result.ok() for result in schema.get_all_operations()]
            assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions",
                                                        "POST /v1/responses", "POST /v1/route",
                                                        "POST /v1/feedback", "GET /v1/models"}
            for operation in operations:
                if not operation.body:  # nothing to generate: one plain call
                    operation.Case().call_and_validate(checks=[not_a_server_error])
                    continue

                strategy = operation.as_strategy(generation_mode=mode)
                if mode is schemathesis.GenerationMode.POSITIVE and operation.path != "/v1/feedback":
                    strategy = st.tuples(strategy, st.sampled_from(MODELS)).map(with_known_model)

                @given(case=strategy)
                @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
                def call(case: schemathesis.Case) -> None:
                    case.call_and_validate(checks=[not_a_server_error])

                call()
    if mode is schemathesis.GenerationMode.POSITIVE:
        assert small.received or large.received  # generated requests went all the way to a backend
