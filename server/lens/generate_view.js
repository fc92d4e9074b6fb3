// Generate mode: the same prompt, sampling settings and seed, streamed twice at once through
// /v1/completions: the base alone (memory: null) and the base with a memory.

import { stream } from "./api.js";

const $ = (id) => document.getElementById(id);

function side(outputId, statusId) {
  const out = $(outputId);
  const status = $(statusId);
  return {
    start(prompt) {
      const shown = document.createElement("span");
      shown.className = "prompt";
      shown.textContent = prompt;
      out.replaceChildren(shown);
      out.dataset.chunks = "0";
      status.textContent = "streaming…";
    },
    add(chunk) {
      const choice = chunk.choices[0];
      if (!choice) return;
      out.append(choice.text);
      out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
      if (choice.finish_reason) status.textContent = `done (${choice.finish_reason})`;
    },
    fail(message) {
      status.textContent = message;
    },
  };
}

export class GenerateView {
  constructor(onError) {
    this.onError = onError;
    this.memories = [];
    this.controller = null;
    $("generate-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.run();
    });
    $("generate-stop").addEventListener("click", () => this.controller?.abort());
    $("gen-memory").addEventListener("change", () => this.syncAlpha());
    $("gen-seed").value = String(Math.floor(Math.random() * 10000));
  }

  setMemories(memories) {
    this.memories = memories;
    $("gen-memory").replaceChildren(...memories.map((m) => new Option(m.id, m.id)));
    $("generate-run").disabled = memories.length === 0;
    this.syncAlpha();
  }

  syncAlpha() {
    const memory = this.memories.find((m) => m.id === $("gen-memory").value);
    if (memory) $("gen-alpha").value = String(memory.alpha);
    $("gen-memory-name").textContent = memory ? memory.id : "memory";
  }

  async run() {
    const prompt = $("prompt").value;
    if (!prompt) {
      $("generate-error").textContent = "Write a prompt first.";
      return;
    }
    $("generate-error").textContent = "";
    const common = {
      prompt,
      max_tokens: Number($("gen-max").value),
      temperature: Number($("gen-temperature").value),
      seed: Number($("gen-seed").value),
    };
    const memory = $("gen-memory").value;
    const runs = [
      [side("gen-base", "gen-base-status"), { ...common, memory: null }],
      [side("gen-mem", "gen-mem-status"), { ...common, memory, alpha: Number($("gen-alpha").value) }],
    ];
    this.controller = new AbortController();
    $("generate-run").disabled = true;
    $("generate-stop").hidden = false;
    const signal = this.controller.signal;
    try {
      await Promise.all(
        runs.map(async ([out, body]) => {
          out.start(prompt);
          try {
            await stream("v1/completions", body, (chunk) => out.add(chunk), signal);
          } catch (err) {
            out.fail(err.name === "AbortError" ? "stopped" : "failed");
            throw err;
          }
        }),
      );
    } catch (err) {
      if (err.name !== "AbortError") this.onError(err, $("generate-error"));
    } finally {
      $("generate-run").disabled = false;
      $("generate-stop").hidden = true;
    }
  }
}
