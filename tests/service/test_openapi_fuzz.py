"""API fuzzing: schemathesis generates requests from the app's own OpenAPI and checks the answers.

A real small engine serves (the random-init R50-FPN); no answer may be a 5xx other than 503, and
every answer must match what the OpenAPI declares (status, content type, body schema).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from scripts.tools.service_process import serving
from service.backends import load_engine
from service.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(engine_dir):
    limits = Settings(max_bytes=2**20, max_pixels=4_000_000, request_timeout_ms=120_000)
    with serving(limits, load_engine(engine_dir)) as live:
        yield live


def test_every_operation_answers_within_its_contract(server):
    # schemathesis' own pytest plugin does not run under this pytest; its strategies do, with hypothesis
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: dict[str, set[int]] = {}
    assert {op.path for op in operations} >= {"/predict", "/v1/models", "/healthz", "/readyz", "/metrics"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def answers_within_contract(case):
            response = case.call(timeout=120)
            statuses.setdefault(operation.path, set()).add(response.status_code)
            assert response.status_code < 500 or response.status_code == 503, (
                operation.path, response.status_code, response.text[:500])
            case.validate_response(
                response, checks=[status_code_conformance, content_type_conformance, response_schema_conformance]
            )

        answers_within_contract()
    # the fuzzer reached the request path's validation (several 4xx kinds), not only the probes
    assert len({s for s in statuses["/predict"] if 400 <= s < 500}) >= 2, statuses
    assert statuses["/healthz"] == {200} and statuses["/v1/models"] == {200}
