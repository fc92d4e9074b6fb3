"""The memories a server holds: load, validate, hand out to requests, retire and free.

A memory in use by running requests cannot vanish under them: `acquire` counts users, `unload`
only marks it retiring (new requests are refused at once), and the weights are dropped when the
last user releases it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memories.manifest import (
    DEFAULT_TEMPERATURE,
    PAPER_ALPHA,
    ManifestError,
    manifest_path,
    read_manifest,
    tokenizer_fingerprint,
)
from memories.models import (
    TOKENIZER_FILES,
    PickledWeightsError,
    VocabularyError,
    is_gguf_path,
    resolve_source,
)
from memories.router import Router, RouterError, load_router
from server.errors import ConflictError, MemoryLoadError, NotFoundError, ServiceUnavailableError
from server.loader import LoadedModel, ModelLoadError, load_causal_lm, load_tokenizer
from server.validation import check_alpha, check_memory_name

log = logging.getLogger(__name__)



def _ids(value: object) -> set[int]:
    """A config's token id (an int, a list of ints, or None) as a set."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list | tuple):
        return {int(v) for v in value if isinstance(v, int)}
    return set()


@dataclass(frozen=True)
class MemoryInfo:
    name: str
    path: str
    domain: str
    alpha: float
    base_model: str | None
    num_parameters: int
    max_model_len: int
    created: int
    description: str
    temperature: float = DEFAULT_TEMPERATURE  # the memory's logits are divided by it before mixing
    # False only for a memory with neither a tokenizer nor a manifest (a published checkpoint as it is): its
    # embedding covers the base vocabulary and its special-token ids agree, but no token->id map was compared.
    tokenizer_verified: bool = True
    router: bool = False  # it ships a learned per-token router: requests may ask for "alpha": "auto"
    weights_format: str = "safetensors"  # or "gguf"
    quantization: str | None = None  # a GGUF file's type
    serving_quantization: str | None = None  # "int8" / "int4" when its linear layers run quantized


@dataclass
class _Entry:
    info: MemoryInfo
    loaded: LoadedModel
    users: int = 0
    retiring: bool = False
    router: Router | None = None  # its learned per-token router (`memories.router`), on the base's device


# Readies a freshly loaded memory for serving (the engine lays out its KV view and captures its graphs).
Preparer = Callable[[str, LoadedModel], None]


class MemoryRegistry:
    def __init__(
        self,
        base: LoadedModel,
        on_loaded: Callable[[str, int], None] | None = None,
        on_freed: Callable[[str], None] | None = None,
    ) -> None:
        self.base = base
        self.base_fingerprint = tokenizer_fingerprint(base.tokenizer)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._loading: set[str] = set()
        # Called with (name, num_parameters) / (name,) so metrics can follow.
        self.on_loaded = on_loaded
        self.on_freed = on_freed

    # -- loading -------------------------------------------------------------------------------
    def load(self, name: str, path: str | Path, alpha: float | None = None,
             prepare: Preparer | None = None) -> MemoryInfo:
        """Validate and load a memory directory. Blocking (disk and device copy): call off the event loop.

        `prepare` runs before the memory becomes visible, so no request can use it half-ready.
        """
        check_memory_name(name)
        if alpha is not None:
            check_alpha(alpha, error=MemoryLoadError)
        with self._lock:
            existing = self._entries.get(name)
            if existing is not None and existing.retiring:
                raise ConflictError(
                    f"memory {name!r} is being unloaded; {existing.users} request(s) still use it. "
                    "Retry when they finish.",
                    param="name",
                    code="memory_unloading",
                    retry_after=1,
                )
            if existing is not None or name in self._loading:
                raise ConflictError(f"a memory named {name!r} is already loaded", param="name")
            self._loading.add(name)
        try:
            entry = self._load_entry(name, str(path), alpha)
            if prepare is not None:
                try:
                    prepare(name, entry.loaded)
                except ValueError as exc:  # the memory cannot be served beside this base (e.g. its KV layout)
                    raise MemoryLoadError(f"memory {name!r} cannot be served: {exc}", param="path") from exc
                # e.g. CUDA out of memory while capturing its graphs
                except (MemoryError, RuntimeError) as exc:
                    raise ServiceUnavailableError(
                        f"memory {name!r} could not be prepared for serving: {exc}",
                        code="memory_prepare_failed",
                    ) from exc
        finally:
            with self._lock:
                self._loading.discard(name)
        with self._lock:
            self._entries[name] = entry
        if self.on_loaded:
            self.on_loaded(name, entry.info.num_parameters)
        log.info("memory %s loaded from %s (%.1fM params, alpha %.2f)", name, path,
                 entry.info.num_parameters / 1e6, entry.info.alpha)
        return entry.info

    def _load_entry(self, name: str, path: str, alpha: float | None) -> _Entry:
        """`path` is a local directory or a hub id (`org/name[@revision]`, through the HF cache). A memory
        without a manifest is served with defaults; its tokenizer is checked by the rules of
        `_check_tokenizer`."""
        try:
            directory = resolve_source(path)
        except ModelLoadError as exc:
            raise MemoryLoadError(f"memory {name!r}: {exc}", param="path") from exc
        manifest = None
        if manifest_path(directory).is_file():
            try:
                manifest = read_manifest(directory)
            except ManifestError as exc:
                raise MemoryLoadError(str(exc), param="path") from exc
        verified = self._check_tokenizer(name, path, directory,
                                         manifest.tokenizer_fingerprint if manifest else None)
        try:
            # A memory runs in the base's scheme: one `--quantization` says how the whole server computes.
            scheme = self.base.serving_quantization or "none"
            loaded = load_causal_lm(
                str(directory), self.base.device, self.base.dtype, self.base.tokenizer, quantization=scheme
            )
        except VocabularyError as exc:
            raise self._mismatch(name, path, str(exc).split(": ", 1)[-1]) from exc
        except PickledWeightsError as exc:
            raise MemoryLoadError(str(exc).replace(str(directory), path), param="path",
                                  code="pickled_weights") from exc
        except ModelLoadError as exc:
            raise MemoryLoadError(str(exc).replace(str(directory), path), param="path") from exc
        loaded.name_or_path = path
        if not verified:
            self._check_unverified(name, path, loaded)
        router = None
        if manifest is not None and manifest.router:
            try:
                router = load_router(directory, manifest.router, self.base.device)
            except RouterError as exc:  # a manifest that names a router promises one: never serve it half
                raise MemoryLoadError(f"memory {name!r}: {str(exc).replace(str(directory), path)}",
                                      param="path", code="router_load_failed") from exc
        default_alpha = manifest.alpha if manifest else PAPER_ALPHA
        info = MemoryInfo(
            name=name,
            path=path,
            domain=manifest.domain if manifest else "general",
            alpha=float(default_alpha if alpha is None else alpha),
            base_model=manifest.base_model if manifest else None,
            num_parameters=loaded.num_parameters,
            max_model_len=loaded.max_model_len,
            created=int(time.time()),
            description=manifest.description if manifest else "",
            temperature=manifest.temperature if manifest else DEFAULT_TEMPERATURE,
            tokenizer_verified=verified,
            router=router is not None,
            weights_format=loaded.weights_format,
            quantization=loaded.quantization,
            serving_quantization=loaded.serving_quantization,
        )
        return _Entry(info=info, loaded=loaded, router=router)

    def _mismatch(self, name: str, path: str, why: str) -> MemoryLoadError:
        return MemoryLoadError(
            f"memory {name!r} ({path}) is incompatible with the base model {self.base.name_or_path}: {why}; "
            "a memory must use exactly the base model's tokenizer",
            param="path",
            code="tokenizer_mismatch",
        )

    def _check_tokenizer(self, name: str, path: str, directory: Path,
                         manifest_fingerprint: str | None) -> bool:
        """The manifest's claim, and the tokenizer shipped beside the weights if any, must match the base's
        token->id map. True when something was compared; False when the memory ships neither (then
        `_check_unverified` applies once the weights are loaded)."""
        fingerprints = {"manifest": manifest_fingerprint} if manifest_fingerprint else {}
        if is_gguf_path(directory) or any((directory / f).exists() for f in TOKENIZER_FILES):
            try:
                fingerprints["tokenizer"] = tokenizer_fingerprint(load_tokenizer(str(directory)))
            except ModelLoadError as exc:
                raise MemoryLoadError(str(exc).replace(str(directory), path), param="path") from exc
        for source, fp in fingerprints.items():
            if fp != self.base_fingerprint:
                raise self._mismatch(
                    name, path, f"its {source} token->id map ({fp[:19]}…) differs from the base tokenizer's "
                    f"({self.base_fingerprint[:19]}…)",
                )
        return bool(fingerprints)

    def _check_unverified(self, name: str, path: str, memory: LoadedModel) -> None:
        """A memory without tokenizer or manifest: its embeddings cover the base vocabulary (checked as it
        loaded, for every memory) and the special-token ids its config names must be ones the base uses for
        the same role."""
        for attr in ("bos_token_id", "eos_token_id"):
            mine = _ids(getattr(memory.model.config, attr, None))
            theirs = (
                _ids(getattr(self.base.model.config, attr, None))
                | _ids(getattr(getattr(self.base.model, "generation_config", None), attr, None))
                | _ids(getattr(self.base.tokenizer, attr, None))
            )
            if mine and theirs and not mine <= theirs:
                raise self._mismatch(name, path,
                                     f"its config's {attr} {sorted(mine)} is not the base's {sorted(theirs)}")

    # -- lookup ----------------------------------------------------------------------------------
    def _live(self, name: str) -> _Entry:
        """A loaded, not retiring memory's entry (call with the lock held); NotFoundError otherwise."""
        entry = self._entries.get(name)
        if entry is None or entry.retiring:
            raise NotFoundError(f"memory {name!r} is not loaded", param="memory", code="memory_not_found")
        return entry

    def get(self, name: str) -> MemoryInfo:
        with self._lock:
            return self._live(name).info

    def loaded(self, name: str) -> LoadedModel:
        """The model of a loaded (not retiring) memory; NotFoundError otherwise."""
        with self._lock:
            return self._live(name).loaded

    def router(self, name: str) -> Router | None:
        """A loaded memory's router (None: it has none); NotFoundError when it is not loaded."""
        with self._lock:
            return self._live(name).router

    def list(self) -> list[MemoryInfo]:
        with self._lock:
            return [e.info for e in self._entries.values() if not e.retiring]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and not entry.retiring

    # -- use by requests -------------------------------------------------------------------------
    def acquire(self, name: str) -> LoadedModel:
        with self._lock:
            entry = self._live(name)
            entry.users += 1
            return entry.loaded

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._entries[name]
            entry.users -= 1
            free = entry.retiring and entry.users == 0
            if free:
                del self._entries[name]
        if free:
            self._free(name, entry)

    def unload(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.retiring:
                raise NotFoundError(f"memory {name!r} is not loaded", param="name", code="memory_not_found")
            entry.retiring = True
            free = entry.users == 0
            if free:
                del self._entries[name]
        if free:
            self._free(name, entry)
        else:
            log.info("memory %s retiring: %d request(s) still use it", name, entry.users)

    def users(self, name: str) -> int:
        with self._lock:
            entry = self._entries.get(name)
            return entry.users if entry else 0

    def _free(self, name: str, entry: _Entry) -> None:
        # Dropped here, not when the engine next sweeps its runner: the weights go now. No gc.collect()
        # or empty_cache(): this can run on the engine thread between steps, and the allocator reuses the
        # memory.
        entry.loaded.model = None  # type: ignore[assignment]
        del entry
        if self.on_freed:
            self.on_freed(name)
        log.info("memory %s unloaded and freed", name)
