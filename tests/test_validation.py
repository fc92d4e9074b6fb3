"""The validation rules every input goes through, the typed errors' fields, and context lengths from
configs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from memories.manifest import Manifest, ManifestError
from memories.mixing import Mixture, check_alpha, sweep
from memories.models import ModelLoadError, context_length
from server.errors import ConflictError, InvalidRequestError, MemdecError, MemoryLoadError, QueueFullError
from server.request import GenerationRequest, PerplexityRequest, SamplingParams
from server.validation import (
    MAX_MEMORY_NAME,
    check_context,
    check_memory_name,
    check_memory_temperature,
    check_token_ids,
    mixture_errors,
    request_context,
    validate_generation,
    validate_perplexity,
)
from server.validation import check_alpha as server_check_alpha

# -- validation rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.01, 1.01, float("nan"), float("inf"), True, "0.5", None])
def test_alpha_outside_the_unit_interval_is_refused_everywhere(alpha):
    with pytest.raises(ValueError, match="alpha must be in"):
        check_alpha(alpha)
    with pytest.raises(InvalidRequestError) as exc:
        server_check_alpha(alpha)
    assert exc.value.param == "alpha" and exc.value.status_code == 400
    with pytest.raises(MemoryLoadError):
        server_check_alpha(alpha, error=MemoryLoadError)


def test_alpha_ends_are_valid():
    assert check_alpha(0) == 0.0 and check_alpha(1) == 1.0 and check_alpha(0.25) == 0.25


@pytest.mark.parametrize("temperature", [0.005, 0.0, -1.0, 500.0, float("nan"), float("inf"), True])
def test_a_temperature_a_request_may_not_use_is_no_manifest_default_either(temperature):
    """One rule for manifests and requests: a memory never loads with a default temperature that would make
    every request that leaves `memory_temperature` out a 400."""
    with pytest.raises(InvalidRequestError) as exc:
        check_memory_temperature(temperature)
    assert exc.value.param == "memory_temperature"
    with pytest.raises(ManifestError, match="'temperature'"):
        Manifest(name="m", domain="d", alpha=0.5, tokenizer_fingerprint="sha256:0", temperature=temperature)


def test_temperature_ends_are_valid():
    for t in (0.01, 1, 100):
        assert check_memory_temperature(t) == float(t)
        assert Manifest(name="m", domain="d", alpha=0.5, tokenizer_fingerprint="sha256:0",
                        temperature=t).temperature == t


def test_token_ids_context_and_memory_names():
    check_token_ids([0, 9], 10, "prompt")
    with pytest.raises(InvalidRequestError, match="token id 10 is out of vocabulary") as exc:
        check_token_ids([3, 10], 10, "input")
    assert exc.value.param == "input"
    with pytest.raises(InvalidRequestError):
        check_token_ids([-1], 10, "prompt")
    assert (request_context(512, None) == 512 and request_context(512, 256) == 256
            and request_context(128, 256) == 128)
    check_context(10, 6, 16)
    with pytest.raises(InvalidRequestError, match="maximum context length is 16 tokens") as exc:
        check_context(10, 7, 16)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "max_tokens"
    check_memory_name("med-v1.2_b")
    for bad in ("", "a b", "a/b", "x" * (MAX_MEMORY_NAME + 1), "none", "other"):
        with pytest.raises(MemoryLoadError) as exc:
            check_memory_name(bad)
        assert exc.value.param == "name"


def test_generation_and_perplexity_requests_are_validated_whole():
    ok = GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=5, stop_token_ids=(4,)),
                           Mixture.one("med", 0.5))
    validate_generation(ok, vocab_size=10, max_len=8)
    cases = [  # each request is built inside the check: a mixture is refused where it is built
        (lambda: GenerationRequest("r", ()), "prompt"),
        (lambda: GenerationRequest("r", (1, 99), SamplingParams(max_tokens=1)), "prompt"),
        (lambda: GenerationRequest("r", (1,), SamplingParams(max_tokens=1), Mixture.one("med", 1.5)),
         "alpha"),
        (lambda: GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=6)), "max_tokens"),
        (lambda: GenerationRequest("r", (1,), SamplingParams(max_tokens=1, logprobs=11)), "logprobs"),
        (lambda: GenerationRequest("r", (1,), SamplingParams(max_tokens=1, stop_token_ids=(10,))),
         "stop_token_ids"),
    ]
    for make, param in cases:
        with pytest.raises(InvalidRequestError) as exc, mixture_errors():
            validate_generation(make(), vocab_size=10, max_len=8)
        assert exc.value.param == param, make
    assert (validate_perplexity(PerplexityRequest("p", ((1, 2, 3),), sweep("m", (0.0, 1.0))), 10, 4096)
            == (1024, 512))
    for make_job, param in [  # built inside the check, as above
        (lambda: PerplexityRequest("p", ()), "input"),
        (lambda: PerplexityRequest("p", ((1,),)), "input"),
        (lambda: PerplexityRequest("p", ((1, 12),)), "input"),
        (lambda: PerplexityRequest("p", ((1, 2),), sweep("m", (2.0,))), "alpha"),
        (lambda: PerplexityRequest("p", ((1, 2),), context_length=9000), "context_length"),
        (lambda: PerplexityRequest("p", ((1, 2),), context_length=64, stride=65), "stride"),
    ]:
        with pytest.raises(InvalidRequestError) as exc, mixture_errors():
            validate_perplexity(make_job(), 10, 4096)
        assert exc.value.param == param, make_job


def test_retry_after_is_a_field_of_every_error():
    assert MemdecError("x").retry_after is None
    assert QueueFullError("full").retry_after == 1  # the class default
    assert ConflictError("draining", retry_after=3).retry_after == 3
    assert QueueFullError("full", retry_after=7).retry_after == 7


def test_context_length_from_any_config_attribute_and_never_guessed():
    assert context_length(SimpleNamespace(n_positions=512)) == 512
    assert context_length(SimpleNamespace(max_position_embeddings=4096), cap=1000) == 1000
    assert context_length(SimpleNamespace(config=SimpleNamespace(max_sequence_length=77))) == 77
    assert context_length(SimpleNamespace(), cap=300) == 300
    with pytest.raises(ModelLoadError, match="cannot tell the model's context length"):
        context_length(SimpleNamespace(hidden_size=8))
