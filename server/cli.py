"""`memdec`: `memdec serve …` runs the server; `memdec memory …` (from memories.cli) builds memories."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from memories.mixing import check_alpha
from memories.quantize import SCHEMES as QUANTIZATION_SCHEMES
from server.config import (
    DEFAULT_SPECULATIVE_TOKENS,
    DTYPES,
    MAX_SPECULATIVE_TOKENS,
    EngineConfig,
    MemorySpec,
    ModelConfig,
    ParallelConfig,
    RegistryFileError,
    ServerConfig,
    read_registry_file,
)
from server.demo import DEMO_ENV, DEMO_MODEL_NAME, DemoNotFoundError, demo_base, demo_memories, find_demo

log = logging.getLogger("memdec")


def apply_demo_defaults(args: argparse.Namespace) -> None:
    """Zero-flag `memdec serve`: without --model, serve the demo's base (its pinned GGUF, with the file's own
    chat template) and all its memories (before any --memory) as `memdec-demo`."""
    if args.model is not None:
        return
    root = find_demo()
    args.model = str(demo_base(root))
    args.memory = [*demo_memories(root), *args.memory]
    args.served_model_name = args.served_model_name or DEMO_MODEL_NAME


def parse_memory_spec(text: str) -> MemorySpec:
    """NAME=PATH or NAME=PATH:ALPHA (a trailing ':number' is the alpha; other colons stay in the path)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[:ALPHA], got {text!r}")
    path, alpha = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            alpha = float(tail)
        except ValueError:
            alpha = None
        else:
            path = head
    try:
        alpha = None if alpha is None else check_alpha(alpha)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} in {text!r}") from None
    return MemorySpec(name=name, path=path, alpha=alpha)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _speculative_tokens(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SPECULATIVE_TOKENS:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SPECULATIVE_TOKENS}], got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def add_serve_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a base model and its memories over an OpenAI-compatible HTTP API",
        description="Serve a Hugging Face causal LM with domain memories over an OpenAI-compatible API.",
    )
    # One group per concern, so `memdec serve --help` reads in sections; flags keep vLLM's names.
    _model_arguments(p.add_argument_group("model"))
    _memory_arguments(p.add_argument_group("memories"))
    _engine_arguments(p.add_argument_group("engine"))
    _speculative_and_parallel_arguments(p.add_argument_group("speculative mixing and tensor parallelism"))
    _server_arguments(p.add_argument_group("server"))
    p.set_defaults(func=cmd_serve)


def _model_arguments(g: argparse._ArgumentGroup) -> None:
    defaults = ModelConfig("-")
    g.add_argument(
        "--model",
        default=None,
        help="base model: local HF directory (safetensors), FILE.gguf (dequantized to --dtype) or hub id "
        "(org/name[@revision], through the HF cache); default: the demo, "
        f"${DEMO_ENV} or ./demo (the base pinned in its base.json and every memory under memories/)",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="load the tokenizer (and its chat template) from here instead of from --model (vLLM's flag)",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the base model's name in the API (default: a hub id as given, a local directory's own name; "
        f"the demo: {DEMO_MODEL_NAME})",
    )
    g.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="Jinja chat template for /v1/chat/completions (default: the tokenizer's; without one, chat "
        "requests get 400)",
    )
    g.add_argument(
        "--dtype", choices=DTYPES, default=defaults.dtype, help="auto: float32 on CPU, bfloat16 on CUDA"
    )
    g.add_argument(
        "--device", default=defaults.device, help="auto (CUDA when available), cpu, cuda, cuda:1 ..."
    )
    g.add_argument(
        "--quantization",
        "-q",
        choices=QUANTIZATION_SCHEMES,
        default=defaults.quantization,
        help="weight-only quantization of the base's and every memory's linear layers on a CPU (vLLM's "
        "flag): int4 or int8 with bfloat16 activations; auto: a GGUF base in its file's precision "
        "(Q4_* -> int4, Q8_0 -> int8), anything else unquantized; none: the --dtype weights",
    )


def _memory_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--memory",
        action="append",
        default=[],
        type=parse_memory_spec,
        metavar="NAME=SOURCE[:ALPHA]",
        help="load a memory at start-up (repeatable): a directory, FILE.gguf or a hub id "
        "(org/name[@revision]); ALPHA overrides its manifest's default "
        "(0.55 for a memory without a manifest)",
    )
    g.add_argument(
        "--registry",
        type=Path,
        default=None,
        metavar="FILE",
        help='JSON list of {"name", "path", "alpha"?} memories to load at start-up (path: a directory '
        "or a hub id)",
    )
    g.add_argument(
        "--persist-registry",
        action="store_true",
        help="with --registry: every runtime load and unload rewrites FILE (atomically), so a restarted "
        "server serves the same memories with the same alpha; a missing FILE starts empty",
    )


def _engine_arguments(g: argparse._ArgumentGroup) -> None:
    engine = EngineConfig()
    g.add_argument(
        "--max-num-seqs", type=_positive_int, default=engine.max_num_seqs, help="sequences decoding at once"
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=engine.max_num_batched_tokens,
        help="tokens per engine step (decode rows first, then prompt chunks); with chunked prefill a "
        "longer prompt is split over several steps, without it a longer prompt runs whole and alone",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=engine.enable_prefix_caching,
        help="reuse the KV cache of full blocks of a prompt prefix seen before, in the base's and each "
        "memory's cache (on by default)",
    )
    g.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=engine.enable_chunked_prefill,
        help="split prompts longer than the step's token budget into chunks that share steps with "
        "running decodes (on by default)",
    )
    g.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=engine.max_model_len,
        help="cap below the model's own context",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=engine.gpu_memory_utilization,
        help="fraction of the GPU's memory this server may use (weights, activations, KV cache); "
        "the KV cache gets what the rest leaves",
    )
    g.add_argument(
        "--num-gpu-blocks-override",
        type=_positive_int,
        default=engine.num_gpu_blocks_override,
        metavar="N",
        help="KV cache pages to allocate instead of measuring (any device; on CPU the default is "
        "room for --max-num-seqs full-length sequences in the base and as many in memories)",
    )
    g.add_argument(
        "--block-size", type=_positive_int, default=engine.block_size, help="base tokens per KV cache page"
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: run each decode step eagerly (the same code, launched kernel by kernel)",
    )


def _speculative_and_parallel_arguments(g: argparse._ArgumentGroup) -> None:
    parallel = ParallelConfig()
    g.add_argument(
        "--speculative-tokens",
        type=_speculative_tokens,
        default=DEFAULT_SPECULATIVE_TOKENS,
        metavar="K",
        help="speculative mixing: a request's memory drafts up to K tokens per round and the base "
        "verifies them in one forward (same output distribution; the engine picks 0..K each step "
        'from measured speed); 0 = off; a request opts out with "speculative": false',
    )
    g.add_argument(
        "--speculative-fixed",
        action="store_true",
        help="always draft K tokens instead of adapting (benchmarks, tests)",
    )
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=_positive_int,
        default=parallel.tensor_parallel_size,
        metavar="N",
        help="shard the base by attention heads over N processes, one per GPU (cuda:0..N-1; on a machine "
        "without GPUs, N CPU processes over gloo); memdec starts them itself. Memories run on rank 0",
    )
    g.add_argument(
        "--tensor-parallel-timeout",
        type=_positive_float,
        default=parallel.timeout,
        metavar="SECONDS",
        help="a tensor-parallel rank that dies, or leaves a base forward unfinished this long, brings the "
        "server down: requests in flight get an error, /health 503, exit code 3",
    )


def _server_arguments(g: argparse._ArgumentGroup) -> None:
    defaults = ServerConfig(model=ModelConfig("-"))
    g.add_argument("--host", default=defaults.host)
    g.add_argument("--port", type=_port, default=defaults.port)
    g.add_argument(
        "--max-queue",
        type=_positive_int,
        default=defaults.max_queue,
        help="waiting requests beyond this get 429 with Retry-After",
    )
    g.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (env MEMDEC_API_KEY)"
    )
    g.add_argument(
        "--admin-key",
        default=None,
        help="key for loading/unloading memories over HTTP (env MEMDEC_ADMIN_KEY)",
    )
    g.add_argument(
        "--enable-admin",
        action="store_true",
        help="allow memory load/unload without an admin key (trusted networks only)",
    )
    g.add_argument(
        "--memory-root",
        type=Path,
        default=None,
        help="memories loaded over HTTP must lie under this directory",
    )
    g.add_argument(
        "--allow-hub-memories",
        action="store_true",
        help="with --memory-root: memories loaded over HTTP may also be hub ids (org/name[@revision]), "
        "fetched into the HF cache unless HF_HUB_OFFLINE is set",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        default=defaults.shutdown_timeout,
        help="seconds in-flight requests get to finish on SIGTERM",
    )
    g.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=defaults.max_body_bytes,
        help="larger request bodies get 413",
    )
    g.add_argument(
        "--log-prompts", action="store_true", help="log prompt text (off by default: prompts are private)"
    )
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def build_parser() -> argparse.ArgumentParser:
    description = "Serve and build Memory Decoder domain memories."
    parser = argparse.ArgumentParser(prog="memdec", description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    try:
        from memories import cli as memories_cli
    except ImportError:  # the toolkit is optional for serving
        return parser
    memories_cli.register(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    apply_demo_defaults(args)
    memory_root = args.memory_root.resolve() if args.memory_root is not None else None
    return ServerConfig(
        model=ModelConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            tokenizer=args.tokenizer,
            quantization=args.quantization,
        ),
        engine=EngineConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=args.enable_prefix_caching,
            enable_chunked_prefill=args.enable_chunked_prefill,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_gpu_blocks_override=args.num_gpu_blocks_override,
            block_size=args.block_size,
            enforce_eager=args.enforce_eager,
            speculative_tokens=args.speculative_tokens,
            speculative_adaptive=not args.speculative_fixed,
        ),
        parallel=ParallelConfig(args.tensor_parallel_size, args.tensor_parallel_timeout),
        memories=tuple(args.memory),
        registry_file=args.registry,
        served_model_name=args.served_model_name,
        chat_template=args.chat_template,
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        api_key=args.api_key or os.environ.get("MEMDEC_API_KEY") or None,
        admin_key=args.admin_key or os.environ.get("MEMDEC_ADMIN_KEY") or None,
        enable_admin=args.enable_admin,
        memory_root=memory_root,
        allow_hub_memories=args.allow_hub_memories,
        persist_registry=args.persist_registry,
        shutdown_timeout=args.shutdown_timeout,
        max_body_bytes=args.max_body_bytes,
        log_prompts=args.log_prompts,
    )


def _file_error(config: ServerConfig) -> str | None:
    """What is wrong with a file or folder the flags name, found before any weights load (None: nothing)."""
    from server.api.chat_template import ChatTemplateFileError, read_chat_template

    if config.persist_registry and config.registry_file is None:
        return "--persist-registry needs --registry FILE (the file it keeps up to date)"
    try:
        if config.registry_file is not None:
            read_registry_file(config.registry_file, missing_ok=config.persist_registry)
        if config.chat_template is not None:
            read_chat_template(config.chat_template)
    except (RegistryFileError, ChatTemplateFileError) as exc:
        return str(exc)
    if config.memory_root is not None and not config.memory_root.is_dir():
        return f"--memory-root {config.memory_root} is not a directory"
    from memories.gguf import inspect as inspect_gguf
    from memories.models import ModelLoadError, is_gguf_path

    for source in (config.model.model, config.model.tokenizer, *(m.path for m in config.memories)):
        if source is not None and is_gguf_path(source):  # a GGUF's header is checked in milliseconds
            try:
                inspect_gguf(source)
            except ModelLoadError as exc:
                return str(exc)
    from server.distributed import check_devices

    return check_devices(config.model, config.parallel)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.api.app import create_app
    from server.api.state import Phase

    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=log_format)
    config = config_from_args(args)
    error = _file_error(config)
    if error is not None:
        print(f"memdec serve: error: {error}", file=sys.stderr)
        return 2
    if config.enable_admin and not config.admin_key:
        log.warning("--enable-admin without --admin-key: anyone who can reach the API can load memories")
    app = create_app(config)
    state = app.state.memdec
    server = _Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=max(1, math.ceil(config.shutdown_timeout)),
        ),
        on_signal=state.begin_shutdown,
    )
    state.on_failure = lambda _message: setattr(server, "should_exit", True)
    server.run()
    if state.phase is Phase.FAILED:
        print(f"memdec serve: error: {state.error}", file=sys.stderr)
        return 1
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, except that SIGTERM/SIGINT first stop admission (503 to new requests) and the
    process exits 0 after its graceful shutdown instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            apply_demo_defaults(args)
        except DemoNotFoundError as exc:
            parser.error(str(exc))  # exit 2, as a missing required flag would
    # Per-load progress bars would flood server logs (hot-loads included); our own CLI work has tqdm.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
