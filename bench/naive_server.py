"""The baseline a user would write by hand: FastAPI + HF `generate` per request, base model only.

    python -m bench.naive_server --model DIR_OR_FILE.gguf --port 8001

FastAPI runs the sync endpoint in its thread pool, so concurrent requests each run their own
`generate` call: no batching across requests, no memory.
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForCausalLM

from memories.models import is_gguf_path, load_causal_lm, load_tokenizer


class Completion(BaseModel):
    prompt: str
    max_tokens: int = 16
    ignore_eos: bool = False


def create_app(model_dir: str) -> FastAPI:
    tokenizer = load_tokenizer(model_dir)  # a directory's, or the one inside a GGUF file
    if is_gguf_path(model_dir):  # the demo base: dequantized to float32, as memdec loads it on a CPU
        model = load_causal_lm(model_dir, "cpu", torch.float32)
    else:  # float32 as memdec uses on a CPU: half-precision weights run far slower there
        dtype = torch.float32 if not torch.cuda.is_available() else "auto"
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=dtype).eval()
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def complete(body: Completion) -> dict:
        ids = tokenizer(body.prompt, return_tensors="pt").input_ids
        forced = {"min_new_tokens": body.max_tokens} if body.ignore_eos else {}
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=body.max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id, **forced)
        new = out[0, ids.shape[1] :]
        return {
            "choices": [{"index": 0, "text": tokenizer.decode(new), "finish_reason": "length"}],
            "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": int(new.numel())},
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
