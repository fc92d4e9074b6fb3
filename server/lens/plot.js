// Perplexity against α as an SVG line (built with DOM calls: no inline markup, no library).

import * as fmt from "./format.js";

const NS = "http://www.w3.org/2000/svg";
const W = 360, H = 200, LEFT = 52, RIGHT = 12, TOP = 12, BOTTOM = 30;

function node(tag, attrs, text) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (text !== undefined) n.textContent = text;
  return n;
}

export class AlphaPlot {
  /** points: [[α, perplexity], ...] for α from 0 to 1; defaultAlpha: the memory's own. */
  constructor(svg, points, defaultAlpha) {
    this.svg = svg;
    const ys = points.map((p) => p[1]).filter(Number.isFinite);
    const lo = Math.min(...ys), hi = Math.max(...ys);
    const pad = (hi - lo) * 0.08 || hi * 0.05 || 1;
    this.lo = lo - pad;
    this.hi = hi + pad;
    const best = points.reduce((a, b) => (b[1] < a[1] ? b : a));
    const parts = [
      node("line", { class: "axis", x1: LEFT, y1: H - BOTTOM, x2: W - RIGHT, y2: H - BOTTOM }),
      node("line", { class: "axis", x1: LEFT, y1: TOP, x2: LEFT, y2: H - BOTTOM }),
    ];
    for (const a of [0, 0.25, 0.5, 0.75, 1]) {
      parts.push(node("text", { class: "tick", x: this.x(a), y: H - BOTTOM + 14, "text-anchor": "middle" }, fmt.alpha(a)));
    }
    parts.push(node("text", { class: "tick", x: (LEFT + W - RIGHT) / 2, y: H - 3, "text-anchor": "middle" }, "α"));
    for (const v of [lo, (lo + hi) / 2, hi]) {
      parts.push(node("text", { class: "tick", x: LEFT - 4, y: this.y(v) + 3, "text-anchor": "end" }, fmt.ppl(v)));
    }
    const d = points.map(([a, p], k) => `${k ? "L" : "M"}${this.x(a).toFixed(1)},${this.y(p).toFixed(1)}`).join("");
    parts.push(node("path", { class: "curve", d }));
    if (defaultAlpha !== null) {
      const x = this.x(defaultAlpha);
      parts.push(node("line", { class: "default", x1: x, y1: TOP, x2: x, y2: H - BOTTOM }));
      parts.push(node("text", { class: "label", x: x + 3, y: TOP + 9 }, `default ${fmt.alpha(defaultAlpha)}`));
    }
    this.dot = node("circle", { class: "current", r: 4.5, cx: 0, cy: 0 });
    parts.push(this.dot);
    svg.replaceChildren(...parts);
    this.best = best;
  }

  x(a) {
    return LEFT + a * (W - LEFT - RIGHT);
  }

  y(p) {
    return TOP + (1 - (p - this.lo) / (this.hi - this.lo)) * (H - TOP - BOTTOM);
  }

  /** Move the marker to (α, perplexity). */
  mark(alpha, value) {
    this.dot.setAttribute("cx", this.x(alpha).toFixed(1));
    this.dot.setAttribute("cy", this.y(value).toFixed(1));
  }
}
