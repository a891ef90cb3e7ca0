"""schemathesis against the server's own OpenAPI schema: generated requests to every operation
of the live server (the admin API's load included: its factory refuses unknown sources as the
real one does) must never get a 5xx."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from fastinfer.server.app import ServerState, build_app
from fastinfer.server.registry import ModelRegistry

from .conftest import ADMIN_KEY, API_KEY, Backend, DEFAULT_BACKENDS, ServerSpec, start_server

# A short context bounds what a generated request can cost (n up to 128, any max_tokens).
FUZZ_BACKENDS = {**DEFAULT_BACKENDS, "v1": Backend(max_model_len=48)}

# The routes, hence the schema, do not depend on the state: read it from an app without models
# (schemathesis' lazy fixture loader does not run on this pytest), send the cases to the live one.
schema = schemathesis.openapi.from_dict(build_app(ServerState(registry=ModelRegistry(lambda *_: None))).openapi())


# A generated model name is never a served one, so most bodies would stop at a 404: name the served
# model in some of them, so that generation, streaming and the admin API's real paths are reached.
@schema.hook("flatmap_body")
def _served_model_sometimes(context, body):
    if isinstance(body, dict) and "model" in body:
        return st.sampled_from([body, {**body, "model": "chat"}, {**body, "model": "chat@v1"}])
    return st.just(body)


@schema.hook("flatmap_path_parameters")
def _served_name_sometimes(context, path_parameters):
    if path_parameters and "name" in path_parameters:
        return st.sampled_from([path_parameters, {**path_parameters, "name": "chat"}])
    return st.just(path_parameters)


@pytest.fixture(scope="module")
def fuzz_server(bank, tmp_path_factory):
    server = start_server(bank, ServerSpec(backends=FUZZ_BACKENDS),
                          tmp_path_factory.mktemp("fuzz") / "audit.jsonl")
    yield server
    server.stop()


def test_the_schema_covers_every_route():
    paths = {op.path for op in (result.ok() for result in schema.get_all_operations())}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
            "/admin/models/{name}/load", "/admin/models/{name}/rollback"} <= paths


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_generated_requests_get_no_server_error(case, fuzz_server):
    key = ADMIN_KEY if case.path.startswith("/admin") else API_KEY
    case.call_and_validate(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {key}"},
                           checks=[not_a_server_error], timeout=60)
