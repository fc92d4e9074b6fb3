"""Keys, memory hot-swap over HTTP, --memory-root confinement, the --registry file, prompt privacy."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from server.config import MemorySpec, ModelConfig, ServerConfig
from tests.api_harness import InProcessServer, assert_error, ids_of, load_hf, sse_events

PROMPT = "The committee expects"


# -- keys ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(zoo):
    config = ServerConfig(
        model=ModelConfig(str(zoo.base)), api_key="user-key", admin_key="admin-key",
        memory_root=zoo.base.parent
    )
    with InProcessServer(config) as s:
        yield s


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_guards_v1_but_not_health(keyed):
    assert keyed.get("/health").status_code == 200
    for headers in ({}, _auth("wrong"), {"Authorization": "user-key"}, {"Authorization": "Basic user-key"}):
        for r in (keyed.get("/v1/models", headers=headers),
                  keyed.post("/v1/completions", {"prompt": "x"}, headers=headers),
                  keyed.post("/v1/perplexity", {"input": "x y"}, headers=headers),
                  keyed.get("/v1/memories", headers=headers)):
            err = assert_error(r, 401, code="invalid_api_key")
            assert err["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    for key in ("user-key", "admin-key"):  # the admin key opens everything
        assert keyed.get("/v1/models", headers=_auth(key)).status_code == 200
        r = keyed.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=_auth(key))
        assert r.status_code == 200
    assert keyed.get("/ready").status_code == 200  # health and readiness stay open for probes


def test_admin_endpoints_need_the_admin_key(keyed):
    body = {"name": "fin", "path": "mem_gpt2"}
    assert_error(keyed.post("/v1/memories", body, headers=_auth("user-key")), 403, code="admin_key_required")
    assert_error(keyed.post("/v1/memories", body), 401)
    assert_error(keyed.post("/v1/memories", body, headers=_auth("wrong")), 401)
    assert keyed.post("/v1/memories", body, headers=_auth("admin-key")).status_code == 200
    assert_error(keyed.delete("/v1/memories/fin", headers=_auth("user-key")), 403)
    assert keyed.delete("/v1/memories/fin", headers=_auth("admin-key")).status_code == 200


def test_admin_endpoints_are_off_without_admin_key(zoo):
    with InProcessServer(ServerConfig(model=ModelConfig(str(zoo.base)), api_key="k")) as s:
        for r in (s.post("/v1/memories", {"name": "fin", "path": str(zoo.mem_gpt2)}, headers=_auth("k")),
                  s.delete("/v1/memories/fin", headers=_auth("k"))):
            err = assert_error(r, 403, code="admin_disabled")
            assert "--admin-key" in err["message"]
        assert s.get("/v1/memories", headers=_auth("k")).json()["data"] == []


# -- hot-swap -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(zoo):
    config = ServerConfig(
        model=ModelConfig(str(zoo.base)), memories=(MemorySpec("med", str(zoo.mem_llama)),),
        enable_admin=True, memory_root=zoo.base.parent,
    )
    with InProcessServer(config) as s:
        yield s


def _memory_ids(server) -> list[str]:
    return sorted(c["id"] for c in server.get("/v1/models").json()["data"] if c["parent"] is not None)


def test_hot_load_use_and_unload(admin, zoo):
    card = admin.post("/v1/memories", {"name": "fin", "path": "mem_gpt2"})
    assert card.status_code == 200, card.text
    card = card.json()
    assert card["id"] == "fin" and card["parent"] == "base" and card["root"] == str(zoo.mem_gpt2.resolve())
    assert ((card["alpha"], card["domain"], card["object"], card["owned_by"])
            == (0.7, "finance", "model", "memdec"))
    assert _memory_ids(admin) == ["fin", "med"]

    # alpha = 1 is the memory alone: greedy tokens equal HF generate on the memory model.
    tok = AutoTokenizer.from_pretrained(str(zoo.base))
    prompt = tok(PROMPT)["input_ids"]
    out = admin.complete(prompt=PROMPT, memory="fin", alpha=1.0, temperature=0, max_tokens=8, ignore_eos=True,
                         logprobs=0, return_tokens_as_token_ids=True)
    with torch.no_grad():
        expected = load_hf(zoo.mem_gpt2).generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
            pad_token_id=tok.eos_token_id,
        )[0, len(prompt):].tolist()
    assert ids_of(out["choices"][0]["logprobs"]["tokens"]) == expected

    deleted = admin.delete("/v1/memories/fin")
    assert deleted.status_code == 200 and deleted.json() == {"id": "fin", "object": "memory", "deleted": True}
    assert _memory_ids(admin) == ["med"]
    assert_error(admin.post("/v1/completions", {"prompt": PROMPT, "memory": "fin"}), 404, "memory")
    assert_error(admin.post("/v1/completions", {"prompt": PROMPT, "model": "fin"}), 404, "model")
    assert_error(admin.delete("/v1/memories/fin"), 404)
    # loadable again, with another default alpha
    again = admin.post("/v1/memories", {"name": "fin", "path": str(zoo.mem_gpt2), "alpha": 0.2})
    assert again.status_code == 200 and again.json()["alpha"] == 0.2
    assert admin.complete(prompt=PROMPT, model="fin", max_tokens=1)["alpha"] == 0.2
    assert admin.delete("/v1/memories/fin").status_code == 200


def test_refused_loads_leave_the_registry_unchanged(admin, zoo):
    err = assert_error(admin.post("/v1/memories", {"name": "alien", "path": "mem_foreign"}), 400, "path")
    assert err["code"] == "tokenizer_mismatch"
    assert_error(admin.post("/v1/memories", {"name": "med", "path": "mem_gpt2"}), 409, "name")
    assert_error(admin.post("/v1/memories", {"name": "base", "path": "mem_gpt2"}), 409, "name")
    assert_error(admin.post("/v1/memories", {"name": "bad name!", "path": "mem_gpt2"}), 400, "name")
    assert _memory_ids(admin) == ["med"]


def test_memory_paths_are_confined_to_the_root(admin, zoo, tmp_path):
    outside = tmp_path / "outside_mem"
    shutil.copytree(zoo.mem_gpt2, outside)  # a valid memory, but outside the root
    root = zoo.base.parent
    link = root / f"escape-{tmp_path.name}"
    link.symlink_to(tmp_path, target_is_directory=True)  # inside the root, pointing out of it
    try:
        for path in (str(outside), f"{link.name}/outside_mem", str(link / "outside_mem"),
                     f"../{root.name}/mem_gpt2", "mem_gpt2/../mem_gpt2", "/etc"):
            err = assert_error(admin.post("/v1/memories", {"name": "fin", "path": path}), 403, "path")
            assert err["code"] == "path_not_allowed"
        assert _memory_ids(admin) == ["med"]
    finally:
        link.unlink()
    ok = admin.post("/v1/memories", {"name": "fin", "path": str(zoo.mem_gpt2)})  # absolute, inside the root
    assert ok.status_code == 200
    assert admin.delete("/v1/memories/fin").status_code == 200


def test_unload_while_streaming_lets_the_stream_finish(admin, zoo):
    assert admin.post("/v1/memories", {"name": "fin", "path": "mem_gpt2"}).status_code == 200
    body = {"prompt": PROMPT, "memory": "fin", "alpha": 0.5, "max_tokens": 200, "ignore_eos": True,
            "stream": True}

    async def scenario():
        async with admin.client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            first = await anext(lines)
            assert first.startswith("data: ")
            assert admin.serving.registry.users("fin") == 1  # mid-stream: the request holds the memory
            deleted = await admin.client.delete("/v1/memories/fin")
            refused = await admin.client.post("/v1/completions", json={"prompt": PROMPT, "memory": "fin"})
            rest = [line async for line in lines]
        return first, deleted, refused, rest

    first, deleted, refused, rest = admin.call(scenario)
    assert deleted.status_code == 200
    assert_error(refused, 404, "memory")
    events = sse_events("\n".join([first, *rest]) + "\n")
    assert events[-1] == "[DONE]" and len(events) > 100  # most of the stream came after the unload
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert admin.serving.registry.users("fin") == 0
    assert _memory_ids(admin) == ["med"]


# -- start-up registry file -------------------------------------------------------------------------------


def test_registry_file_loads_memories_at_start_up(zoo, tmp_path):
    registry = tmp_path / "memories.json"
    rel = os.path.relpath(zoo.mem_qwen_padded, tmp_path)
    registry.write_text(json.dumps([{"name": "law", "path": rel},
                                    {"name": "fin", "path": str(zoo.mem_gpt2), "alpha": 0.1}]))
    config = ServerConfig(model=ModelConfig(str(zoo.base)),
                          memories=(MemorySpec("med", str(zoo.mem_llama), 0.9),), registry_file=registry)
    with InProcessServer(config) as s:
        cards = {c["id"]: c for c in s.get("/v1/memories").json()["data"]}
        assert {k: c["alpha"] for k, c in cards.items()} == {"med": 0.9, "law": 0.4, "fin": 0.1}
        assert cards["law"]["root"] == str(zoo.mem_qwen_padded.resolve())


# -- privacy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompts_are_not_logged_unless_asked(zoo, caplog, log_prompts):
    secret = "my secret diagnosis is lupus"
    config = ServerConfig(model=ModelConfig(str(zoo.base)), log_prompts=log_prompts)
    with InProcessServer(config) as s, caplog.at_level(logging.DEBUG):
        assert s.post("/v1/completions", {"prompt": secret, "max_tokens": 2}).status_code == 200
        assert s.post("/v1/completions",
                      {"prompt": secret, "max_tokens": 2, "stream": True}).status_code == 200
    assert "cmpl-" in caplog.text  # the requests were logged ...
    assert (secret in caplog.text) == log_prompts  # ... their text only when asked
