// Entry point: asks for the API key when the server wants one, lists the memories, wires the three modes.

import { call, storedKey, storeKey } from "./api.js";
import { CompareView } from "./compare_view.js";
import { $ } from "./dom.js";
import { GenerateView } from "./generate_view.js";
import { ScoreView } from "./score_view.js";

const text = () => $("text").value;

/** Show an API error where it happened; a 401 also brings the key form back with the server's message. */
function onError(err, where) {
  if (err.status === 401) {
    askKey(err.message);
    return;
  }
  where.textContent = err.message;
}

const views = [new ScoreView(text, onError), new CompareView(text, onError), new GenerateView(onError)];

function askKey(message) {
  $("app").hidden = true;
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  $("served").textContent = "waiting for an API key";
  $("key-input").focus();
}

async function connect() {
  let models;
  try {
    models = await call("v1/models");
  } catch (err) {
    if (err.status === 401) {
      askKey(storedKey() ? err.message : "");
      return;
    }
    $("served").textContent = `cannot reach the API: ${err.message}`;
    return;
  }
  const base = models.data.find((m) => m.parent === null);
  const memories = models.data.filter((m) => m.parent !== null);
  $("served").textContent = `${base ? base.id : "?"} with ${memories.length} ${memories.length === 1 ? "memory" : "memories"}`;
  $("key-form").hidden = true;
  $("app").hidden = false;
  $("forget-key").hidden = !storedKey();
  for (const view of views) view.setMemories(memories);
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  storeKey($("key-input").value.trim());
  $("key-input").value = "";
  connect();
});

$("forget-key").addEventListener("click", () => {
  storeKey(null);
  location.reload();
});

$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  if (!file) return;
  $("text").value = await file.text();
  showSize();
});

function showSize() {
  const n = text().length;
  $("text-size").textContent = n ? `${n.toLocaleString()} characters` : "";
}
$("text").addEventListener("input", showSize);

// Tabs (WAI-ARIA tabs pattern: arrows move between tabs, the selected one is the tab stop).
const tabs = [...document.querySelectorAll("[role=tab]")];
function select(tab) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  $("text").closest("section").hidden = tab.id === "tab-generate"; // generation has its own prompt
}
tabs.forEach((tab, k) => {
  tab.addEventListener("click", () => select(tab));
  tab.addEventListener("keydown", (e) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    if (!step) return;
    const next = tabs[(k + step + tabs.length) % tabs.length];
    select(next);
    next.focus();
  });
});

connect();
