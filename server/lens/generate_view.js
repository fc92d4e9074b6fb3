// Generate mode: the same prompt, sampling settings and seed, streamed twice at once through
// /v1/completions: the base alone (memory: null) and the base with a memory.

import { stream } from "./api.js";
import { $, el } from "./dom.js";
import { Task } from "./task.js";

function side(outputId, statusId) {
  const out = $(outputId);
  const status = $(statusId);
  return {
    start(prompt) {
      out.replaceChildren(el("span", prompt, "prompt"));
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
    this.memories = [];
    this.task = new Task("generate", (signal) => this.run(signal), onError);
    $("gen-memory").addEventListener("change", () => this.syncAlpha());
    $("gen-seed").value = String(Math.floor(Math.random() * 10000));
  }

  setMemories(memories) {
    this.memories = memories;
    $("gen-memory").replaceChildren(...memories.map((m) => new Option(m.id, m.id)));
    this.task.enabled = memories.length > 0;
    this.syncAlpha();
  }

  syncAlpha() {
    const memory = this.memories.find((m) => m.id === $("gen-memory").value);
    if (memory) $("gen-alpha").value = String(memory.alpha);
    $("gen-memory-name").textContent = memory ? memory.id : "memory";
  }

  async run(signal) {
    const prompt = $("prompt").value;
    if (!prompt) throw new Error("Write a prompt first.");
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
    // Both sides run to their end (or Stop) before the mode is free again; the first failure is reported.
    const results = await Promise.allSettled(
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
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
    return "";
  }
}
