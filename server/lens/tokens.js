// The scored text as one span per token, coloured by what the memory changes at the current α.
// Keyboard: the text is one tab stop (roving tabindex); arrows move between tokens.

import { change } from "./mix.js";

const STRONG = 0.5; // hurt tokens this strong are also underlined (colour is not the only cue)

export class TokenView {
  /** `onShow(i)` is called with the token index the pointer or the focus is on. */
  constructor(container, doc, onShow) {
    this.container = container;
    this.doc = doc;
    this.onShow = onShow;
    this.spans = [];
    this.active = -1;
    this.alpha = 0;
    this.render();
  }

  render() {
    const { container, doc } = this;
    const fragment = document.createDocumentFragment();
    doc.pieces.forEach((piece, i) => {
      const span = document.createElement("span");
      span.className = doc.base[i] === null ? "tok unscored" : "tok";
      span.textContent = piece;
      span.dataset.i = String(i);
      if (this.onShow) span.tabIndex = -1;
      fragment.append(span);
      this.spans.push(span);
    });
    container.replaceChildren(fragment);
    if (!this.onShow) return; // a read-only strip (compare mode)
    const first = this.next(-1, 1);
    if (first >= 0) this.spans[first].tabIndex = 0;
    container.addEventListener("mouseover", (e) => {
      const i = e.target?.dataset?.i;
      if (i !== undefined) this.show(Number(i), false);
    });
    container.addEventListener("focusin", (e) => {
      const i = e.target?.dataset?.i;
      if (i !== undefined) this.show(Number(i), false);
    });
    container.addEventListener("keydown", (e) => this.key(e));
  }

  /** Colour every scored token for mixture weight `alpha`. */
  colour(alpha) {
    this.alpha = alpha;
    const { base, memory_lp: memory } = this.doc;
    for (let i = 0; i < this.spans.length; i++) {
      if (base[i] === null) continue;
      const { delta, strength } = change(base[i], memory[i], alpha);
      const span = this.spans[i];
      span.classList.toggle("help", delta > 0);
      span.classList.toggle("hurt", delta < 0);
      span.classList.toggle("strong", strength >= STRONG);
      span.style.setProperty("--a", strength.toFixed(3));
    }
  }

  /** The next scored token with visible text from i in direction dir (−1 when there is none). */
  next(i, dir) {
    for (let j = i + dir; j >= 0 && j < this.spans.length; j += dir) {
      if (this.doc.base[j] !== null && this.doc.pieces[j] !== "") return j;
    }
    return -1;
  }

  /** The next token (in dir) where the memory changes the log-prob the most, among the next 200. */
  nextBig(i, dir, alpha) {
    let best = -1;
    let bestDelta = 0;
    for (let j = this.next(i, dir), seen = 0; j >= 0 && seen < 200; j = this.next(j, dir), seen++) {
      const { delta } = change(this.doc.base[j], this.doc.memory_lp[j], alpha);
      if (delta > bestDelta) [best, bestDelta] = [j, delta];
    }
    return best;
  }

  key(e) {
    const here = this.active;
    const moves = {
      ArrowRight: () => this.next(here, 1),
      ArrowLeft: () => this.next(here, -1),
      Home: () => this.next(-1, 1),
      End: () => this.next(this.spans.length, -1),
      PageDown: () => this.nextBig(here, 1, this.alpha),
      PageUp: () => this.nextBig(here, -1, this.alpha),
    };
    const move = moves[e.key];
    if (!move) return;
    e.preventDefault();
    const target = move();
    if (target >= 0) this.show(target, true);
  }

  show(i, focus) {
    if (this.active >= 0) {
      this.spans[this.active].classList.remove("active");
      this.spans[this.active].tabIndex = -1;
    }
    this.active = i;
    const span = this.spans[i];
    span.classList.add("active");
    span.tabIndex = 0;
    if (focus) span.focus();
    this.onShow?.(i);
  }
}
