// The demo page of `pipcook-sandbox serve`: plain JS, no dependencies, nothing
// fetched from outside this server. It asks /info what kind of model this is
// and shows the matching input: an image drop zone, a textarea or a row field.
"use strict";

const $ = (id) => document.getElementById(id);
let mode = "generic";
let imageFile = null;

function modeFor(type) {
  if (!type) return "generic";
  if (/^Image|ObjectDetection|Segmentation/.test(type)) return "image";
  if (/^Text/.test(type)) return "text";
  if (/^Tabular/.test(type)) return "table";
  return "generic";
}

async function checkHealth() {
  try {
    const res = await fetch("/healthz", { cache: "no-store" });
    const body = await res.json();
    $("health").textContent = body.ok ? "worker ready" : `worker ${body.worker}`;
  } catch (e) {
    $("health").textContent = "the server does not answer";
  }
}

function setImage(file) {
  if (!file) return;
  imageFile = file;
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  img.hidden = false;
  $("drop-hint").hidden = true;
  $("file-name").textContent = `${file.name} (${file.size} bytes)`;
}

function setupImage() {
  const drop = $("drop");
  $("choose").addEventListener("click", (e) => { e.stopPropagation(); $("file").click(); });
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("file").addEventListener("change", () => setImage($("file").files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) setImage(file);
  });
}

function lines(text) {
  return text.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
}

// What to send: {body, headers, names} or an error message string.
function buildRequest() {
  const json = (inputs) => ({ body: JSON.stringify({ inputs }), headers: { "Content-Type": "application/json" }, names: inputs });
  if (mode === "image") {
    if (!imageFile) return "choose or drop an image first";
    const form = new FormData();
    form.append("file", imageFile, imageFile.name);
    return { body: form, headers: {}, names: [imageFile.name] };
  }
  if (mode === "text") {
    const text = $("text").value;
    const inputs = $("per-line").checked ? lines(text) : (text.trim() ? [text] : []);
    return inputs.length ? json(inputs) : "type some text first";
  }
  if (mode === "table") {
    const row = $("row").value.trim();
    return row ? json([row]) : "type the values of a row first";
  }
  const files = Array.from($("generic-files").files);
  const inputs = lines($("generic").value);
  if (!files.length) return inputs.length ? json(inputs) : "type an input or choose a file first";
  const form = new FormData();
  inputs.forEach((s) => form.append("inputs", s));
  files.forEach((f) => form.append("file", f, f.name));
  return { body: form, headers: {}, names: inputs.concat(files.map((f) => f.name)) };
}

function scoreOf(result) {
  for (const key of ["score", "probability", "confidence", "prob"]) {
    if (typeof result[key] === "number") return result[key];
  }
  return null;
}

function short(text) {
  text = String(text);
  return text.length > 60 ? text.slice(0, 57) + "…" : text;
}

// Object detection: one list of {label, score, box: [x, y, w, h]} per input image.
function isDetections(result) {
  return Array.isArray(result) && result.every((d) => d && typeof d === "object" && Array.isArray(d.box) &&
    d.box.length === 4 && d.box.every((v) => typeof v === "number" && Number.isFinite(v)));
}

const BOX_COLOURS = ["#00e5ff", "#ff2bd6", "#ffd400", "#39ff14", "#ff7a00", "#7c4dff"];

// The uploaded image on a canvas, each box drawn over it with its label and score; boxes are in
// the image's own pixels, the canvas shows it scaled to a readable size.
async function drawDetections(dets) {
  const canvas = $("detections");
  const img = $("preview");
  if (!img.complete || !img.naturalWidth) await img.decode();
  const w = img.naturalWidth, h = img.naturalHeight;
  const scale = Math.min(640 / w, 480 / h, Math.max(1, 320 / Math.max(w, h)));
  canvas.width = Math.round(w * scale);
  canvas.height = Math.round(h * scale);
  const g = canvas.getContext("2d");
  g.imageSmoothingEnabled = scale < 1;
  g.drawImage(img, 0, 0, canvas.width, canvas.height);
  const labels = [...new Set(dets.map((d) => String(d.label)))];
  g.font = "600 13px system-ui, sans-serif";
  g.textBaseline = "top";
  for (const d of dets) {
    const colour = BOX_COLOURS[labels.indexOf(String(d.label)) % BOX_COLOURS.length];
    const [x, y, bw, bh] = d.box.map((v) => v * scale);
    g.lineWidth = 3;
    g.strokeStyle = colour;
    g.strokeRect(x, y, bw, bh);
    const score = scoreOf(d);
    const text = short(String(d.label)) + (score !== null && score >= 0 && score <= 1 ? ` ${(score * 100).toFixed(0)}%` : "");
    const tw = g.measureText(text).width + 6;
    const ty = y >= 18 ? y - 18 : y;
    g.fillStyle = colour;
    g.fillRect(x - 1.5, ty, tw, 18);
    g.fillStyle = "#000";
    g.fillText(text, x + 2, ty + 2);
  }
  canvas.hidden = false;
}

function showDetections(result, name) {
  const li = document.createElement("li");
  li.className = "result detections";
  const head = document.createElement("span");
  head.className = "label";
  head.textContent = result.length === 1 ? "1 object" : `${result.length} objects`;
  li.append(head);
  const items = document.createElement("ul");
  items.className = "objects";
  for (const d of result) {
    const item = document.createElement("li");
    const score = scoreOf(d);
    item.textContent = `${short(d.label)}${score !== null ? ` ${(score * 100).toFixed(1)}%` : ""} at ` +
      `[${d.box.map((v) => Math.round(v)).join(", ")}]`;
    items.append(item);
  }
  li.append(items);
  if (name !== undefined) {
    const from = document.createElement("div");
    from.className = "muted";
    from.textContent = `input: ${short(name)}`;
    li.append(from);
  }
  return li;
}

function showResults(data, names) {
  const list = $("results");
  list.replaceChildren();
  $("detections").hidden = true;
  if (mode === "image" && data.length === 1 && isDetections(data[0])) {
    list.append(showDetections(data[0], names[0]));
    drawDetections(data[0]).catch((e) => {
      $("error").textContent = `could not draw the boxes: ${e}`;
      $("error").hidden = false;
    });
    return;
  }
  data.forEach((result, i) => {
    const li = document.createElement("li");
    li.className = "result";
    if (result && typeof result === "object" && !Array.isArray(result) && "label" in result) {
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = String(result.label);
      li.append(label);
      const score = scoreOf(result);
      if (score !== null) {
        const s = document.createElement("span");
        s.className = "score";
        const pct = score >= 0 && score <= 1;
        s.textContent = pct ? `${(score * 100).toFixed(1)}%` : `score ${score.toPrecision(4)}`;
        li.append(s);
        if (pct) {
          const bar = document.createElement("div");
          bar.className = "bar";
          const fill = document.createElement("span");
          fill.style.width = `${(score * 100).toFixed(1)}%`;
          bar.append(fill);
          li.append(bar);
        }
      }
    } else {
      const value = document.createElement("code");
      value.textContent = typeof result === "string" ? result : JSON.stringify(result);
      li.append(value);
    }
    if (names[i] !== undefined) {
      const from = document.createElement("div");
      from.className = "muted";
      from.textContent = `input: ${short(names[i])}`;
      li.append(from);
    }
    list.append(li);
  });
}

async function predict() {
  $("error").hidden = true;
  const req = buildRequest();
  if (typeof req === "string") {
    $("error").textContent = req;
    $("error").hidden = false;
    return;
  }
  $("predict").disabled = true;
  $("busy").hidden = false;
  try {
    const res = await fetch("/predict", { method: "POST", body: req.body, headers: req.headers });
    let body;
    try { body = await res.json(); } catch (e) { body = { success: false, message: `HTTP ${res.status}` }; }
    $("raw").textContent = JSON.stringify(body, null, 2);
    $("raw-box").hidden = false;
    if (body.success) {
      showResults(body.data, req.names);
    } else {
      $("results").replaceChildren();
      $("error").textContent = `${res.status}: ${body.message}`;
      $("error").hidden = false;
    }
  } catch (e) {
    $("error").textContent = `the request failed: ${e}`;
    $("error").hidden = false;
  } finally {
    $("predict").disabled = false;
    $("busy").hidden = true;
    checkHealth();
  }
}

async function main() {
  let info = {};
  try { info = await (await fetch("/info")).json(); } catch (e) { /* generic page */ }
  mode = modeFor(info.type);
  $("model-type").textContent = info.type || "model";
  document.title = `${info.type || "model"} · pipcook-sandbox`;
  $(`input-${mode}`).hidden = false;
  if (info.report) $("report-link").hidden = false;
  if (mode === "table" && Array.isArray(info.columns) && info.columns.length) {
    // textContent only: the column names come from the pipeline's scripts
    $("columns").textContent = `Columns, in order: ${info.columns.join(", ")}`;
    $("columns").hidden = false;
    $("row").placeholder = info.columns.join(",");
  }
  if (mode === "image") setupImage();
  $("predict").addEventListener("click", predict);
  for (const id of ["row"]) $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") predict(); });
  document.body.dataset.mode = mode;
  checkHealth();
}

main();
