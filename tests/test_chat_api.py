"""Chat and tokenizer endpoints in process: a model without a chat template, `--chat-template FILE`, the API
key, and the served model's name."""

from __future__ import annotations

from server.config import ModelConfig, ServerConfig
from testkit.models import CHAT_TEMPLATE
from tests.api_harness import InProcessServer, assert_error

MESSAGES = [{"role": "user", "content": "The court held"}]
# A template of the file's own, so that its use is visible in the prompt.
FILE_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")


def test_a_model_without_a_chat_template_refuses_chat_with_a_clear_400(zoo):
    with InProcessServer(ServerConfig(model=ModelConfig(str(zoo.base)))) as s:
        err = assert_error(s.post("/v1/chat/completions", {"messages": MESSAGES}), 400, "messages",
                           "no_chat_template")
        assert "--chat-template" in err["message"]
        assert_error(s.post("/tokenize", {"messages": MESSAGES}), 400, "messages", "no_chat_template")
        assert s.get("/tokenizer_info").json()["chat_template"] is None
        assert s.post("/tokenize", {"prompt": "The court"}).status_code == 200  # plain text needs no template
        assert s.get("/v1/models").json()["data"][0]["id"] == "base"  # the directory's name, not its path


def test_chat_template_file_replaces_the_tokenizers(zoo, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(FILE_TEMPLATE)
    config = ServerConfig(model=ModelConfig(str(zoo.chat_base)), chat_template=template,
                          served_model_name="tiny")
    with InProcessServer(config) as s:
        ids = s.post("/tokenize", {"messages": MESSAGES}).json()["tokens"]
        assert s.post("/detokenize", {"tokens": ids}).json()["prompt"] == "[user] The court held\n[assistant]"
        assert s.get("/tokenizer_info").json()["chat_template"] == FILE_TEMPLATE != CHAT_TEMPLATE
        out = s.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}).json()
        assert out["usage"]["prompt_tokens"] == len(ids) and out["model"] == "tiny"


def test_api_key_guards_chat_and_the_tokenizer_but_not_version(zoo):
    config = ServerConfig(model=ModelConfig(str(zoo.chat_base)), api_key="k")
    with InProcessServer(config) as s:
        assert_error(s.post("/v1/chat/completions", {"messages": MESSAGES}), 401)
        assert_error(s.post("/tokenize", {"prompt": "x"}), 401)
        assert_error(s.post("/detokenize", {"tokens": [1]}), 401)
        assert_error(s.get("/tokenizer_info"), 401)
        assert s.get("/version").status_code == 200
        key = {"Authorization": "Bearer k"}
        assert s.post("/tokenize", {"prompt": "x"}, headers=key).status_code == 200
        r = s.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}, headers=key)
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_malformed_chat_bodies_are_400_naming_messages(zoo):
    bodies = [{"messages": "hi"}, {"messages": [{"content": "x"}]},
              {"messages": [{"role": "user", "content": 5}]}, {}]
    with InProcessServer(ServerConfig(model=ModelConfig(str(zoo.chat_base)))) as s:
        for body in bodies:
            err = assert_error(s.post("/v1/chat/completions", body), 400)
            assert err["param"].startswith("messages"), (body, err)
