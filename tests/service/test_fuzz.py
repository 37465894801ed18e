"""The API fuzzed against its own OpenAPI document (schemathesis, on a real `fewstep serve` process).

Bounded examples per operation so that CI stays fast. Every response must be documented (status,
content type, body schema) and none may be a 5xx, for valid and invalid inputs alike; input the
schema forbids must be refused. Not checked: that every schema-valid input is accepted. Limits that
are settings (`max_job_items`, the model's step counts, prompt length) are enforced by the server
but not spelled out in the static document, so a schema-valid body may still get a 400.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import Server

pytestmark = pytest.mark.slow  # a `fewstep serve` process
EXAMPLES = 15


def test_no_5xx_and_no_undocumented_response(server: Server) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # every route is in the document
    failures: dict[str, str] = {}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            case.call_and_validate(base_url=server.url, timeout=60, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as e:  # keep going: report every operation that fails
            failures[op.label] = f"{type(e).__name__}: {str(e)[:1500]}"
    assert failures == {}, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())


def test_oversized_headers_are_refused_with_431(server: Server) -> None:
    for size in (20_000, 70_000):
        big = httpx.get(server.url + "/v1/models", headers={"X-Big": "a" * size})
        assert big.status_code == 431 and big.json()["error"]["code"] == "HeadersTooLarge", size
    assert httpx.get(server.url + "/v1/models", headers={"X-Small": "a" * 8_000}).status_code == 200
