// textinv front-end extension (loaded by ComfyUI from WEB_DIRECTORY, served at /extensions/<pack>/).
// 1. Train Embedding shows a live loss chart, fed by the server's `textinv.loss` events. The latest
//    preview image arrives through ComfyUI's own progress previews and shows on the node; the memory
//    mode the run uses (`textinv.memory`: fast or low, and why) is written under the chart.
// 2. Prompt text boxes autocomplete `<` with the pseudo-words available: embedding files
//    (GET /embeddings) and the words named by textinv nodes in the graph.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN = "TextinvTrainEmbedding";
const WORD_NODES = { TextinvTrainEmbedding: "name", TextinvComposeConcepts: "name" };

// ---- loss chart --------------------------------------------------------------------------------
function drawChart(canvas, state) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(0, 0, w, h);
  const train = state.train, evals = state.evals;
  const values = train.map((p) => p[1]).concat(evals.map((p) => p[1]));
  ctx.fillStyle = "#bbb";
  ctx.font = "11px sans-serif";
  if (!values.length) {
    ctx.fillText("loss: waiting for training", 8, h / 2);
    return;
  }
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const total = Math.max(state.total || 1, 1);
  const left = 36, right = w - 6, top = 16, bottom = h - 16;
  const x = (s) => left + ((right - left) * s) / total;
  const y = (v) => bottom - ((bottom - top) * (v - lo)) / (hi - lo);
  ctx.strokeStyle = "#444";
  ctx.strokeRect(left, top, right - left, bottom - top);
  ctx.fillText(hi.toPrecision(3), 2, top + 4);
  ctx.fillText(lo.toPrecision(3), 2, bottom);
  const last = train.length ? train[train.length - 1] : null;
  ctx.fillText(`step ${last ? last[0] : 0}/${state.total || "?"}` + (last ? `  loss ${last[1].toFixed(4)}` : ""), left, 11);
  if (state.memory) ctx.fillText(state.memory.slice(0, 90), left, h - 2);
  // raw (grey) and exponentially smoothed (blue) training loss
  const line = (points, color, width) => {
    if (points.length < 2) return;
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    points.forEach(([s, v], i) => (i ? ctx.lineTo(x(s), y(v)) : ctx.moveTo(x(s), y(v))));
    ctx.stroke();
  };
  line(train, "#666", 1);
  let acc = null;
  line(train.map(([s, v]) => [s, (acc = acc === null ? v : 0.9 * acc + 0.1 * v)]), "#4a8cff", 2);
  ctx.fillStyle = "#f08020";  // evaluation loss: orange dots
  for (const [s, v] of evals) {
    ctx.beginPath();
    ctx.arc(x(s), y(v), 3, 0, 2 * Math.PI);
    ctx.fill();
  }
  ctx.lineWidth = 1;
}

function addChart(node) {
  const canvas = document.createElement("canvas");
  canvas.width = 360;
  canvas.height = 140;
  canvas.className = "textinv-loss-chart";
  canvas.style.width = "100%";
  node.textinvLoss = { canvas, train: [], evals: [], total: 0, memory: "" };
  node.addDOMWidget("loss_chart", "textinv_loss_chart", canvas, {
    serialize: false,
    getMinHeight: () => 140,
    getHeight: () => 140,
  });
  drawChart(canvas, node.textinvLoss);
}

function onLoss(event) {
  const d = event.detail || {};
  const node = app.graph && app.graph.getNodeById(Number(d.node) || d.node);
  if (!node || !node.textinvLoss) return;
  const state = node.textinvLoss;
  if (d.step === 1 && "loss" in d) { state.train = []; state.evals = state.evals.filter((e) => e[0] === 0); }
  state.total = d.total || state.total;
  if ("loss" in d) state.train.push([d.step, d.loss]);
  if ("eval_loss" in d) {
    if (d.step === 0) state.evals = [];
    state.evals.push([d.step, d.eval_loss]);
  }
  state.canvas.dataset.points = String(state.train.length);
  drawChart(state.canvas, state);
  node.setDirtyCanvas(true, false);
}

function onMemory(event) {
  const d = event.detail || {};
  const node = app.graph && app.graph.getNodeById(Number(d.node) || d.node);
  if (!node || !node.textinvLoss) return;
  node.textinvLoss.memory = d.text || "";
  node.textinvLoss.canvas.dataset.memory = node.textinvLoss.memory;
  drawChart(node.textinvLoss.canvas, node.textinvLoss);
  node.setDirtyCanvas(true, false);
}

// ---- `<` autocomplete --------------------------------------------------------------------------
let fileWords = [];
async function refreshFileWords() {
  try {
    const response = await api.fetchApi("/embeddings");
    const names = await response.json();
    fileWords = names.map((n) => `<${n.split("/").pop()}>`);
  } catch (e) {
    fileWords = [];
  }
}

function graphWords() {
  const words = [];
  for (const node of (app.graph && app.graph._nodes) || []) {
    if (node.type === "TextinvLoadPseudoWord") {
      const word = node.widgets?.find((w) => w.name === "word")?.value;
      const file = node.widgets?.find((w) => w.name === "embedding_file")?.value;
      if (word) words.push(word);
      else if (file && file !== "(none)") words.push(`<${file.split("/").pop().replace(/\.[^.]+$/, "")}>`);
    } else if (WORD_NODES[node.type]) {
      const name = node.widgets?.find((w) => w.name === WORD_NODES[node.type])?.value;
      if (name) words.push(`<${name}>`);
    }
  }
  return words;
}

function availableWords() {
  return [...new Set(graphWords().concat(fileWords))].sort();
}

let menu = null;
function closeMenu() {
  if (menu) menu.remove();
  menu = null;
}

function showMenu(textarea) {
  const pos = textarea.selectionStart;
  const before = textarea.value.slice(0, pos);
  const open = before.lastIndexOf("<");
  if (open < 0 || /[\s>]/.test(before.slice(open + 1))) return closeMenu();
  const typed = before.slice(open);
  const matches = availableWords().filter((w) => w.startsWith(typed)).slice(0, 12);
  if (!matches.length) return closeMenu();
  closeMenu();
  menu = document.createElement("div");
  menu.className = "textinv-autocomplete";
  Object.assign(menu.style, {
    position: "fixed", zIndex: 10000, background: "#222", color: "#ddd", border: "1px solid #555",
    font: "12px monospace", borderRadius: "4px", padding: "2px 0",
  });
  const rect = textarea.getBoundingClientRect();
  menu.style.left = `${rect.left + 8}px`;
  menu.style.top = `${rect.bottom + 2}px`;
  matches.forEach((word, i) => {
    const item = document.createElement("div");
    item.textContent = word;
    item.dataset.word = word;
    Object.assign(item.style, { padding: "2px 10px", cursor: "pointer", background: i ? "" : "#3a3a5a" });
    item.addEventListener("mousedown", (e) => {
      e.preventDefault();
      insertWord(textarea, open, word);
    });
    menu.appendChild(item);
  });
  document.body.appendChild(menu);
}

function insertWord(textarea, open, word) {
  const pos = textarea.selectionStart;
  textarea.value = textarea.value.slice(0, open) + word + textarea.value.slice(pos);
  const caret = open + word.length;
  textarea.setSelectionRange(caret, caret);
  textarea.dispatchEvent(new Event("input", { bubbles: true }));
  closeMenu();
}

function attachAutocomplete(textarea) {
  if (!textarea || textarea.dataset.textinvAutocomplete) return;
  textarea.dataset.textinvAutocomplete = "1";
  textarea.addEventListener("focus", () => refreshFileWords());
  textarea.addEventListener("input", () => showMenu(textarea));
  textarea.addEventListener("keydown", (e) => {
    if (!menu) return;
    if (e.key === "Escape") return closeMenu();
    if (e.key === "Enter" || e.key === "Tab") {
      const first = menu.querySelector("[data-word]");
      if (first) {
        e.preventDefault();
        const open = textarea.value.slice(0, textarea.selectionStart).lastIndexOf("<");
        insertWord(textarea, open, first.dataset.word);
      }
    }
  });
  textarea.addEventListener("blur", () => setTimeout(closeMenu, 150));
}

app.registerExtension({
  name: "textinv.ui",
  async setup() {
    api.addEventListener("textinv.loss", onLoss);
    api.addEventListener("textinv.memory", onMemory);
    api.addEventListener("textinv.snapshot", () => refreshFileWords());
    api.addEventListener("executed", () => refreshFileWords());
    await refreshFileWords();
  },
  async nodeCreated(node) {
    if (node.comfyClass === TRAIN) addChart(node);
    for (const widget of node.widgets || []) {
      const el = widget.inputEl || widget.element;
      if (el && el.tagName === "TEXTAREA") attachAutocomplete(el);
    }
  },
});
