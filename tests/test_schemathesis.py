"""Property-based API testing with schemathesis: the OpenAPI document against a real `memdec serve`.

Schemathesis reads the app's OpenAPI document and, for every operation, generates schema-valid and
deliberately invalid requests (its examples, coverage and fuzzing phases; bounded and seeded), sends
them over HTTP to a real server process (tiny models, API and admin keys, a memory root, a short
context so that every request is cheap) and checks each response: never a 5xx; status codes, content
types, headers (`Allow` on 405s included) and bodies as documented; schema-invalid input refused with
a 4xx. The server log must hold no traceback afterwards.

`positive_data_acceptance` is off: a body can be schema-valid yet refused on purpose by rules the
document cannot express (n above --max-n, prompt + max_tokens past the context, alpha without a
memory, an unknown memory or model): those are 4xx by design. Every other schemathesis check runs.

The document is built in process from `create_app` (no models are loaded: loading happens in the
lifespan) so that pytest can collect one test per operation; a test below checks that it is exactly
what the live server serves at /openapi.json. MEMDEC_SCHEMATHESIS_EXAMPLES raises the fuzzing budget
(default 100 per operation).
"""

from __future__ import annotations

import os
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.config import ModelConfig, ServerConfig
from server.errors import MemoryLoadError
from server.loader import load_base
from server.registry import MemoryRegistry
from tests.api_harness import InProcessServer, assert_error

ADMIN_KEY = "fuzz-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}  # the admin key opens every endpoint
MAX_EXAMPLES = int(os.environ.get("MEMDEC_SCHEMATHESIS_EXAMPLES", "100"))
SEED = 20250801

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": {"max-examples": MAX_EXAMPLES, "mode": "all", "database": "none"},
        "checks": {"positive_data_acceptance": {"enabled": False}},
    }
)
schema = schemathesis.openapi.from_dict(create_app(ServerConfig(model=ModelConfig("tiny"))).openapi(),
                                        config=CONFIG)


@pytest.fixture(scope="module")
def live(zoo, live_server):
    args = [
        # The chat-capable model, so that chat requests are rendered and run, not all refused for want of a
        # template.
        "--model", str(zoo.chat_base), "--served-model-name", "tiny", "--memory", f"med={zoo.mem_llama}",
        "--api-key", "fuzz-user-key", "--admin-key", ADMIN_KEY, "--memory-root", str(zoo.base.parent),
        # Short contexts keep every generated request cheap: prompt + max_tokens <= 64 tokens.
        "--max-model-len", "64", "--max-num-seqs", "16",
    ]  # fmt: skip  # flag/value pairs on one line
    with live_server("schemathesis", args) as s:
        yield s
        assert "Traceback" not in s.logs(), s.logs()[-5000:]
        # The server's own count of what it answered: no 5xx there either.
        statuses: Counter = Counter()
        for family in text_string_to_metric_families(httpx.get(s.url + "/metrics").text):
            for sample in family.samples:
                if sample.name == "memdec_requests_total":
                    statuses[sample.labels["status"]] += int(sample.value)
        print(f"\nschemathesis: {sum(statuses.values())} API requests answered, "
              f"by status {dict(sorted(statuses.items()))}")
        assert not [code for code in statuses if code.startswith("5")], statuses


def test_the_document_is_what_the_server_serves(live):
    served = httpx.get(live.url + "/openapi.json").json()
    assert served == create_app(ServerConfig(model=ModelConfig("tiny"))).openapi()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/perplexity", "/v1/memories", "/metrics",
            "/tokenize", "/detokenize", "/tokenizer_info", "/version"} <= set(served["paths"])


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_fails(case, live):
    case.call_and_validate(base_url=live.url, headers=AUTH, timeout=60)


# -- what the fuzzing found, pinned ---------------------------------------------------------------------


def test_405_lists_every_method_of_the_path(zoo):
    with InProcessServer(ServerConfig(model=ModelConfig(str(zoo.base)), enable_admin=True)) as s:
        r = s.request("PUT", "/v1/memories")  # GET and POST are two routes on one path
        assert_error(r, 405)
        assert r.headers["allow"] == "GET, POST"
        assert s.request("PATCH", "/v1/completions").headers["allow"] == "POST"


@pytest.mark.parametrize("path", ["x" * 300, "a/" + "y" * 300 + "/b", "bad\x00path"])
def test_memory_paths_the_os_cannot_look_up_are_400(zoo, path):
    """Without --memory-root too: the OSError (name too long) or ValueError (NUL) is the client's mistake."""
    with InProcessServer(ServerConfig(model=ModelConfig(str(zoo.base)), enable_admin=True)) as s:
        assert_error(s.post("/v1/memories", {"name": "m", "path": path}), 400, "path")
        assert s.get("/v1/memories").json()["data"] == []


def test_registry_refuses_an_unusable_path_with_a_load_error(zoo):
    registry = MemoryRegistry(load_base(ModelConfig(str(zoo.base))))
    with pytest.raises(MemoryLoadError):
        registry.load("m", "/tmp/" + "x" * 300)
