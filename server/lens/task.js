// A mode's long-running work, started from its form: while it runs the Run button is disabled and a Stop
// button aborts it; its progress bar and status line (where the mode has them) follow it, and its error is
// shown in the mode's alert line. Elements are found by the mode's id prefix (`score-run`, `score-stop`, …).

import { $ } from "./dom.js";

export class Task {
  /** `work(signal, task)` resolves to the status line to show when done; `onError(err, where)` shows errors. */
  constructor(prefix, work, onError) {
    this.el = Object.fromEntries(
      ["form", "run", "stop", "progress", "status", "error"].map((name) => [name, $(`${prefix}-${name}`)]),
    );
    this.work = work;
    this.onError = onError;
    this.controller = null;
    this.el.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.start();
    });
    this.el.stop.addEventListener("click", () => this.controller?.abort());
  }

  progress(done, total, text) {
    if (this.el.progress) {
      this.el.progress.max = total;
      this.el.progress.value = done;
    }
    this.status(text);
  }

  status(text) {
    if (this.el.status) this.el.status.textContent = text;
  }

  set enabled(on) {
    this.el.run.disabled = !on;
  }

  async start() {
    const { run, stop, progress, error } = this.el;
    error.textContent = "";
    this.controller = new AbortController();
    run.disabled = true;
    stop.hidden = false;
    if (progress) {
      progress.hidden = false;
      progress.value = 0;
    }
    try {
      this.status(await this.work(this.controller.signal, this));
    } catch (err) {
      this.status("");
      if (err.name !== "AbortError") this.onError(err, error);
    } finally {
      if (progress) progress.hidden = true;
      run.disabled = false;
      stop.hidden = true;
    }
  }
}
