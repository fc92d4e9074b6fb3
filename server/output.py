"""Engine token deltas -> API text deltas: detokenisation and stop strings, off the engine thread.

The engine works on token ids; each request's `OutputProcessor` runs where its caller consumes the
stream (the event loop), turning `EngineOutput`s into `RequestOutput`s with text. A stop string is
found here: the processor truncates the text, finishes the output with reason `stop`, and tells its
caller to end the request in the engine (tokens the engine produced meanwhile are dropped).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from server.request import EngineOutput, FinishReason, GenerationRequest, RequestOutput


class IncrementalDetokenizer:
    """Text deltas from token ids, robust to tokens that end inside a UTF-8 character.

    Decodes a short window (a few tokens of left context, so leading-space rules of the tokenizer
    apply) instead of the whole output each step.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt: list[int]) -> None:
        self.tokenizer = tokenizer
        self.prefix_offset = max(len(prompt) - 5, 0)
        self.read_offset = len(prompt)

    def _decode(self, ids: list[int]) -> str:
        # Special tokens (EOS) end a completion; like vLLM's default, they are not part of its text.
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence in, one string out
        return text

    def step(self, all_ids: list[int]) -> str:
        prefix = self._decode(all_ids[self.prefix_offset : self.read_offset])
        full = self._decode(all_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
            return full[len(prefix) :]
        return ""


class OutputProcessor:
    """One request's text: detokenises its tokens one at a time and watches for stop strings."""

    def __init__(self, request: GenerationRequest, tokenizer: PreTrainedTokenizerBase) -> None:
        self.stops = request.params.stop
        self._ids: list[int] = list(request.prompt_token_ids)
        self._detok = IncrementalDetokenizer(tokenizer, self._ids)
        # chars withheld while a stop string may be forming
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stopped: str | None = None  # the stop string that ended the request

    def process(self, out: EngineOutput) -> RequestOutput | None:
        """The API's delta for one engine delta; None when nothing is ready to send yet."""
        if self.stopped is not None:
            return None
        tokens = out.new_token_ids
        for n, token in enumerate(tokens, start=1):
            self._ids.append(token)
            checked = len(self.text)
            self.text += self._detok.step(self._ids)
            if self._check_stop(checked):
                tokens = tokens[:n]
                break
        finished = out.finished or self.stopped is not None
        visible = len(self.text) if finished else max(self._sent, len(self.text) - self._hold)
        new_text = self.text[self._sent : visible]
        self._sent = visible
        if not (new_text or tokens or finished or out.prompt_logprobs is not None):
            return None
        logprobs = out.new_logprobs[: len(tokens)] if out.new_logprobs is not None else None
        if self.stopped is not None:
            return RequestOutput(
                request_id=out.request_id, new_token_ids=tokens, new_text=new_text, new_logprobs=logprobs,
                prompt_logprobs=out.prompt_logprobs, finished=True, finish_reason=FinishReason.STOP,
                stop_reason=self.stopped, num_prompt_tokens=out.num_prompt_tokens,
                num_output_tokens=out.num_output_tokens - (len(out.new_token_ids) - len(tokens)),
            )
        return RequestOutput(
            request_id=out.request_id, new_token_ids=tokens, new_text=new_text, new_logprobs=logprobs,
            prompt_logprobs=out.prompt_logprobs, finished=out.finished, finish_reason=out.finish_reason,
            stop_reason=out.stop_reason, error=out.error, num_prompt_tokens=out.num_prompt_tokens,
            num_output_tokens=out.num_output_tokens,
        )

    def _check_stop(self, checked: int) -> bool:
        if not self.stops or len(self.text) == checked:
            return False
        # A new match must end inside the new delta, so it starts at most `_hold` chars before it.
        start = max(0, checked - self._hold)
        best: tuple[int, str] | None = None
        for stop in self.stops:
            idx = self.text.find(stop, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        self.text = self.text[: best[0]]
        self.stopped = best[1]
        return True
