"""`memdec` argument parsing, configuration, and start-up failures with their exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from server import cli
from server.config import DEFAULT_SPECULATIVE_TOKENS, MemorySpec
from testkit.server import free_port


@pytest.mark.parametrize("text,expected", [
    ("med=/m/med", MemorySpec("med", "/m/med", None)),
    ("med=/m/med:0.3", MemorySpec("med", "/m/med", 0.3)),
    ("med=rel/dir:1", MemorySpec("med", "rel/dir", 1.0)),
    ("med=/m:odd/dir", MemorySpec("med", "/m:odd/dir", None)),
    ("med=/m:odd/dir:0", MemorySpec("med", "/m:odd/dir", 0.0)),
])  # fmt: skip  # a table: one row per case
def test_memory_specs(text, expected):
    assert cli.parse_memory_spec(text) == expected


@pytest.mark.parametrize("text",
                         ["med", "=/m", "med=", "med=/m:1.5", "med=/m:-0.1", "med=/m:nan", "med=/m:inf"])
def test_bad_memory_specs(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_memory_spec(text)


def test_serve_flags_build_the_config(tmp_path):
    args = cli.build_parser().parse_args([
        "serve", "--model", "m", "--memory", "a=/x", "--memory", "b=/y:0.2",
        "--registry", str(tmp_path / "r.json"), "--dtype", "float32", "--device", "cpu",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "1024", "--max-queue", "3", "--api-key", "k",
        "--admin-key", "a", "--enable-admin", "--memory-root", str(tmp_path), "--served-model-name", "base",
        "--shutdown-timeout", "5", "--port", "9001", "--max-model-len", "256",
        "--gpu-memory-utilization", "0.5", "--num-gpu-blocks-override", "300", "--block-size", "32",
        "--enforce-eager", "--speculative-tokens", "3", "--speculative-fixed",
        "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
    ])  # fmt: skip  # flag/value pairs on one line
    config = cli.config_from_args(args)
    assert config.model.model == "m" and config.model.dtype == "float32" and config.model.device == "cpu"
    assert config.memories == (MemorySpec("a", "/x"), MemorySpec("b", "/y", 0.2))
    assert config.engine.max_num_seqs == 8 and config.engine.max_num_batched_tokens == 1024
    assert config.engine.max_model_len == 256
    assert (config.engine.gpu_memory_utilization, config.engine.num_gpu_blocks_override) == (0.5, 300)
    assert config.engine.block_size == 32 and config.engine.enforce_eager
    assert (config.engine.speculative_tokens, config.engine.speculative_adaptive) == (3, False)
    assert not config.engine.enable_prefix_caching and not config.engine.enable_chunked_prefill
    assert (config.max_queue, config.api_key, config.admin_key, config.enable_admin) == (3, "k", "a", True)
    assert config.memory_root == tmp_path.resolve() and config.served_model_name == "base"
    assert (config.shutdown_timeout, config.port) == (5.0, 9001)
    assert config.registry_file == tmp_path / "r.json"


def test_defaults_and_secret_env_fallbacks(monkeypatch):
    monkeypatch.delenv("MEMDEC_API_KEY", raising=False)
    monkeypatch.delenv("MEMDEC_ADMIN_KEY", raising=False)
    config = cli.config_from_args(cli.build_parser().parse_args(["serve", "--model", "m"]))
    assert (config.port, config.host, config.api_key, config.admin_key) == (8000, "0.0.0.0", None, None)
    assert not config.enable_admin and not config.log_prompts and config.memory_root is None
    assert (config.engine.speculative_tokens == DEFAULT_SPECULATIVE_TOKENS > 0
            and config.engine.speculative_adaptive)
    assert config.engine.enable_prefix_caching and config.engine.enable_chunked_prefill  # vLLM's defaults
    args = ["serve", "--model", "m", "--enable-prefix-caching", "--enable-chunked-prefill"]
    assert cli.config_from_args(cli.build_parser().parse_args(args)).engine.enable_prefix_caching
    monkeypatch.setenv("MEMDEC_API_KEY", "from-env")
    monkeypatch.setenv("MEMDEC_ADMIN_KEY", "admin-env")
    config = cli.config_from_args(cli.build_parser().parse_args(["serve", "--model", "m"]))
    assert (config.api_key, config.admin_key) == ("from-env", "admin-env")
    config = cli.config_from_args(cli.build_parser().parse_args(["serve", "--model", "m",
                                                                 "--api-key", "flag"]))
    assert config.api_key == "flag"  # the flag wins over the environment


@pytest.mark.parametrize("argv", [
    ["serve"],  # no --model and no demo (MEMDEC_DEMO_DIR points nowhere below)
    ["serve", "--model", "m", "--port", "70000"],
    ["serve", "--model", "m", "--max-num-seqs", "0"],
    ["serve", "--model", "m", "--dtype", "int8"],
    ["serve", "--model", "m", "--memory", "broken"],
    ["serve", "--model", "m", "--shutdown-timeout", "-1"],
    ["serve", "--model", "m", "--gpu-memory-utilization", "1.5"],
    ["serve", "--model", "m", "--num-gpu-blocks-override", "0"],
    ["serve", "--model", "m", "--speculative-tokens", "17"],
    ["serve", "--model", "m", "--speculative-tokens", "-1"],
    [],
])  # fmt: skip  # a table: one row per case
def test_bad_arguments_exit_2(argv, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMDEC_DEMO_DIR", str(tmp_path / "no-demo"))  # else `serve` alone serves ./demo
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_memory_toolkit_commands_are_registered(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out
    from memories import cli as memories_cli

    if hasattr(memories_cli, "register"):
        assert "memory" in out


def test_bad_registry_file_fails_before_loading(tmp_path, capsys):
    registry = tmp_path / "r.json"
    for content in ("not json", json.dumps({"a": 1}), json.dumps([{"name": "x"}]),
                    json.dumps([{"name": "x", "path": "p", "alpha": 2}])):
        registry.write_text(content)
        assert cli.main(["serve", "--model", "unused", "--registry", str(registry)]) == 2
        assert "registry file" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "unused", "--registry", str(tmp_path / "missing.json")]) == 2
    assert cli.main(["serve", "--model", "unused", "--memory-root", str(tmp_path / "nope")]) == 2


def test_bad_chat_template_file_fails_before_loading(tmp_path, capsys):
    assert cli.main(["serve", "--model", "unused", "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    assert "cannot read chat template" in capsys.readouterr().err
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
    assert cli.main(["serve", "--model", "unused", "--chat-template", str(broken)]) == 2
    assert "not a valid Jinja template" in capsys.readouterr().err


def test_unloadable_model_exits_1_with_the_reason(tmp_path, capsys):
    port = free_port()
    missing = tmp_path / "no-such-model"
    code = cli.main(["serve", "--model", str(missing), "--host", "127.0.0.1", "--port", str(port),
                     "--log-level", "error"])
    assert code == 1
    assert str(missing) in capsys.readouterr().err


def test_unloadable_startup_memory_exits_1(zoo, capsys):
    port = free_port()
    argv = ["serve", "--model", str(zoo.base), "--memory", f"alien={zoo.mem_foreign}", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "error"]  # fmt: skip  # flag/value pairs on one line
    assert cli.main(argv) == 1
    assert "tokenizer" in capsys.readouterr().err
    assert Path(zoo.mem_foreign).is_dir()
