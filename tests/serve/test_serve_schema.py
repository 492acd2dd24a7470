"""A schemathesis run over the server's OpenAPI schema: no server errors, every response conforms.

Cases come from schemathesis' Hypothesis strategies (valid and invalid bodies) and are checked with its
default checks (no 5xx, documented status codes, content types, headers and response schemas). The default
run sends about 250 requests; the slow run at least 1,000.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402

from matryoshka2d import MatryoshkaEncoder  # noqa: E402
from tests.helpers.serve import running_server  # noqa: E402

# generated cases (valid, invalid) of POST /v1/embeddings, and of each GET (no parameters: one distinct case)
BUDGETS = {"fast": {"embeddings": (190, 60), "others": (1, 0), "least": 250},
           "slow": {"embeddings": (760, 240), "others": (1, 0), "least": 1000}}


@pytest.fixture(scope="module")
def schema_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="mean").save(tmp_path_factory.mktemp("st") / "tiny")
    log = tmp_path_factory.mktemp("st-log") / "server.log"
    with running_server(folder, log, "--served-model-name", "tiny", "--batch-wait-ms", "0", "--max-client-batch",
                        "64") as server:
        yield server


def _fuzz(operation, mode: GenerationMode, examples: int, base_url: str) -> int:
    """Send ``examples`` generated cases of ``operation`` and validate every response; return how many ran."""
    sent = [0]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case) -> None:
        sent[0] += 1
        case.call_and_validate(base_url=base_url)

    check()
    return sent[0]


def run_schemathesis(server, budget: dict) -> dict[str, int]:
    """Every operation of the live schema with ``budget``'s generated cases; the requests sent per operation."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        name = f"{operation.method.upper()} {operation.path}"
        budgets = budget["embeddings"] if name == "POST /v1/embeddings" else budget["others"]
        for mode, examples in zip((GenerationMode.POSITIVE, GenerationMode.NEGATIVE), budgets, strict=True):
            if examples:
                sent[name] = sent.get(name, 0) + _fuzz(operation, mode, examples, server.url)
    assert "POST /v1/embeddings" in sent and "GET /v1/models" in sent
    assert sum(sent.values()) >= budget["least"], sent
    print(f"schemathesis sent {sum(sent.values())} requests: {sent}")
    assert "Traceback" not in server.log_text()
    return sent


def test_schemathesis_finds_no_server_error_or_schema_violation(schema_server) -> None:
    run_schemathesis(schema_server, BUDGETS["fast"])


@pytest.mark.slow
def test_schemathesis_1000_requests(schema_server) -> None:
    run_schemathesis(schema_server, BUDGETS["slow"])
