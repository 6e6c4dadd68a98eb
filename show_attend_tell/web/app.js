// The page: send a photo to /api/caption, show the caption, and draw a word's attention map over the photo.
// The map (g x g, summing to 1) covers the whole photo, since the encoder sees the photo resized to a square.
// The COCO detector's boxes are drawn over it too. Whatever the response holds is shown as text (textContent),
// never parsed as HTML.
"use strict";

// As in the paper's figures (and visualize.py): the map is upsampled to 224 x 224 and blurred with a
// Gaussian of 20 pixels, then stretched over the photo; the browser's bilinear scaling smooths the rest.
const SIDE = 224;
const SIGMA = 20;
const DARKEST = 0.78; // opacity of the shade over places the model did not look at

const $ = (id) => document.getElementById(id);
const elements = {
  drop: $("drop"), file: $("file"), beam: $("beam"), status: $("status"), error: $("error"),
  result: $("result"), figure: $("figure"), photo: $("photo"), overlay: $("overlay"), shown: $("shown"),
  caption: $("caption"), score: $("score"), alternatives: $("alternatives"), timings: $("timings"),
  health: $("health"), mention: $("mention"), guidance: $("guidance"), guided: $("guided"),
  templates: $("templates"), detector: $("detector"), discouraged: $("discouraged"), boxes: $("boxes"),
  boxesToggle: $("boxes-toggle"), showBoxes: $("show-boxes"), boxesLabel: $("boxes-label"),
  repeatWords: $("repeat-words"),
};
const state = {
  file: null, result: null, pinned: null, request: 0, maxUpload: 0, photoUrl: null, detectorLoaded: true,
};

// W[i][c]: how much grid cell c contributes to pixel i along one axis, i.e. the Gaussian blur (renormalised
// at the borders) of the cell's block of pixels. The smoothed map is then W alpha W^T.
function blurWeights(g) {
  const weights = [];
  for (let i = 0; i < SIDE; i++) {
    const row = new Float32Array(g);
    let total = 0;
    for (let k = 0; k < SIDE; k++) {
      const w = Math.exp(-((i - k) ** 2) / (2 * SIGMA * SIGMA));
      row[Math.min(g - 1, Math.floor((k * g) / SIDE))] += w;
      total += w;
    }
    for (let c = 0; c < g; c++) row[c] /= total;
    weights.push(row);
  }
  return weights;
}

const weightCache = new Map();

function smoothMap(alpha) {
  const g = alpha.length;
  if (!weightCache.has(g)) weightCache.set(g, blurWeights(g));
  const W = weightCache.get(g);
  const rows = W.map((w) => {
    const out = new Float32Array(g); // (W alpha)[i][c]
    for (let r = 0; r < g; r++) for (let c = 0; c < g; c++) out[c] += w[r] * alpha[r][c];
    return out;
  });
  const heat = new Float32Array(SIDE * SIDE);
  let peak = 0;
  for (let y = 0; y < SIDE; y++) {
    for (let x = 0; x < SIDE; x++) {
      let v = 0;
      for (let c = 0; c < g; c++) v += rows[y][c] * W[x][c];
      heat[y * SIDE + x] = v;
      if (v > peak) peak = v;
    }
  }
  if (peak > 0) for (let i = 0; i < heat.length; i++) heat[i] /= peak;
  return heat;
}

function drawAttention(index) {
  const context = elements.overlay.getContext("2d");
  context.clearRect(0, 0, SIDE, SIDE);
  const words = elements.caption.querySelectorAll(".word");
  words.forEach((button, i) => button.classList.toggle("active", i === index));
  if (index === null || !state.result) {
    elements.figure.dataset.word = "";
    elements.shown.hidden = true;
    return;
  }
  const heat = smoothMap(state.result.attention[index]);
  const image = context.createImageData(SIDE, SIDE);
  for (let i = 0; i < heat.length; i++) {
    // Bright where the model looked, shaded elsewhere, with a warm tint on the peak.
    const h = heat[i];
    image.data[4 * i] = 255 * h;
    image.data[4 * i + 1] = 140 * h;
    image.data[4 * i + 2] = 20;
    image.data[4 * i + 3] = 255 * (DARKEST * (1 - h) + 0.25 * h * h);
  }
  context.putImageData(image, 0, 0);
  const word = state.result.words[index];
  elements.figure.dataset.word = word;
  elements.shown.textContent = word;
  elements.shown.hidden = false;
}

function showWord(index) {
  drawAttention(index === null ? state.pinned : index);
}

function percent(probability) {
  return `${Math.round(100 * probability)}%`;
}

// "cat (ImageNet label: Egyptian cat, 96%)", "giraffe (detected giraffe, 81%)" or "sofa (your word)": where a
// guided word came from.
function guideSource(guide) {
  if (guide.source === "user") return "your word";
  if (guide.source === "detector") return `detected ${guide.label}, ${percent(guide.probability)}`;
  return `ImageNet label: ${guide.label}, ${percent(guide.probability)}`;
}

// The COCO classes nothing saw, whose words the search discouraged: nearly all of the 80 when the detector ran,
// so the note names people (the words captions invent most) and counts the rest; its tooltip lists them all.
function renderDiscouraged(result) {
  const classes = result.discouraged;
  const others = classes.filter((name) => name !== "person");
  const notes = [];
  if (others.length < classes.length) notes.push("No person seen: people words discouraged.");
  if (others.length > 3) {
    const other = others.length < classes.length ? " other" : "";
    notes.push(`${others.length}${other} COCO objects not seen: their words discouraged.`);
  } else if (others.length) {
    notes.push(`Not seen: ${others.join(", ")}, their words discouraged.`);
  }
  elements.discouraged.textContent = notes.join(" ");
  elements.discouraged.title = classes.length ? `discouraged: ${classes.join(", ")}` : "";
  elements.discouraged.hidden = notes.length === 0;
}

// The detector's boxes over the photo, in percent of its size so that they scale with the displayed photo.
function renderBoxes(result) {
  const boxes = result.detections.map((detection) => {
    const [x1, y1, x2, y2] = detection.box.map(Number);
    const left = Math.max(0, Math.min(x1, x2) / result.width);
    const top = Math.max(0, Math.min(y1, y2) / result.height);
    const right = Math.min(1, Math.max(x1, x2) / result.width);
    const bottom = Math.min(1, Math.max(y1, y2) / result.height);
    const box = document.createElement("div");
    box.className = "box";
    box.style.left = `${100 * left}%`;
    box.style.top = `${100 * top}%`;
    box.style.width = `${100 * Math.max(0, right - left)}%`;
    box.style.height = `${100 * Math.max(0, bottom - top)}%`;
    const label = document.createElement("span");
    label.textContent = `${detection.class} ${percent(detection.score)}`;
    box.append(label);
    return box;
  });
  elements.boxes.replaceChildren(...boxes.reverse()); // best first in the answer: drawn last, on top
  const count = boxes.length;
  elements.boxesLabel.textContent = `show the COCO detector's ${count === 1 ? "box" : `${count} boxes`}`;
  elements.boxesToggle.hidden = count === 0;
  showBoxes();
}

function showBoxes() {
  elements.boxes.hidden = !elements.showBoxes.checked;
  placeLabels();
}

function overlaps(a, b) {
  return a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
}

// The labels of boxes that nearly coincide (the detector often finds an object twice) would cover each other:
// each label goes down its box, a label's height at a time, until it clears the labels of the better boxes.
function placeLabels() {
  if (elements.boxes.hidden) return;
  const placed = [];
  for (const label of [...elements.boxes.querySelectorAll(".box span")].reverse()) {
    label.style.top = "0px";
    const start = label.getBoundingClientRect();
    const room = label.parentElement.clientHeight - start.height; // the lowest top that keeps it in its box
    let shift = 0;
    const at = (dy) => ({ left: start.left, right: start.right, top: start.top + dy, bottom: start.bottom + dy });
    while (shift + start.height <= room && placed.some((other) => overlaps(other, at(shift)))) shift += start.height;
    label.style.top = `${shift}px`;
    placed.push(at(shift));
  }
}

function renderGuidance(result) {
  const notes = result.guidance.map((guide) => {
    const met = guide.position === null ? " (no caption could use it)" : "";
    return `${guide.word} (${guideSource(guide)})${met}`;
  });
  let text = notes.length ? `Guided by: ${notes.join("; ")}` : "";
  if (result.template) {
    // The words are a template's, not the decoder's: say so, and show what the decoder itself wrote.
    const own = result.alternatives.length ? ` The model's own caption: "${result.alternatives[0].caption}".` : "";
    text = `Written from a template for ${notes.join("; ")}.${own}`;
  }
  elements.guided.textContent = text;
  elements.guided.hidden = text === "";
  renderDiscouraged(result);
}

function renderCaption(result) {
  elements.caption.replaceChildren();
  const guidedAt = new Map(result.guidance.filter((g) => g.position !== null).map((g) => [g.position, g]));
  result.words.forEach((word, index) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "word";
    button.textContent = word;
    const guide = guidedAt.get(index);
    if (guide) {
      button.classList.add("guided");
      button.dataset.source = guide.source;
      button.title = `guided: ${guideSource(guide)}`;
    }
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("pointerenter", () => showWord(index));
    button.addEventListener("pointerleave", () => showWord(null));
    button.addEventListener("focus", () => showWord(index));
    button.addEventListener("blur", () => showWord(null));
    button.addEventListener("click", () => {
      state.pinned = state.pinned === index ? null : index;
      elements.caption.querySelectorAll(".word").forEach((b, i) => {
        b.setAttribute("aria-pressed", String(i === state.pinned));
      });
      showWord(state.pinned);
    });
    elements.caption.append(button, " ");
  });
  renderGuidance(result);
  // Beams are ranked by the length-normalised score; the raw log-probability favours short captions.
  elements.score.textContent = `score ${result.score.toFixed(2)} (log-probability ${result.log_prob.toFixed(2)}) · ${result.width}×${result.height} pixels · ${result.grid_size}×${result.grid_size} attention grid · ${decoderName(result.decoder)}`;
  elements.score.title = result.template
    ? "a template caption comes first; the model's own beams follow, ranked by score"
    : "captions are ranked by score = log-probability / (words + 1)^length penalty";
  elements.alternatives.replaceChildren();
  if (result.alternatives.length === 0) {
    const item = document.createElement("li");
    item.className = "none";
    item.textContent = result.beam_size === 1 ? "none with beam size 1" : "none";
    elements.alternatives.append(item);
  }
  for (const alternative of result.alternatives) {
    const item = document.createElement("li");
    const text = document.createElement("span");
    text.textContent = alternative.caption;
    const score = document.createElement("span");
    score.className = "alt-score";
    score.textContent = `${alternative.score.toFixed(2)} (log-probability ${alternative.log_prob.toFixed(2)})`;
    item.append(text, " ", score);
    elements.alternatives.append(item);
  }
  const t = result.timings;
  elements.timings.textContent = `model ${Math.round(t.decode_ms)} ms · total ${Math.round(t.total_ms)} ms (waiting ${Math.round(t.queue_ms)} ms, reading the image ${Math.round(t.image_ms)} ms)`;
}

function showError(message) {
  elements.error.textContent = message;
  elements.error.hidden = false;
}

// Which decoder wrote the caption, as the API names it ("lstm" or "transformer").
function decoderName(decoder) {
  return decoder === "transformer" ? "Transformer decoder" : "LSTM decoder (the paper's)";
}

function megabytes(bytes) {
  return `${(bytes / 2 ** 20).toFixed(bytes < 2 ** 20 ? 2 : 1)} MB`;
}

async function caption(file) {
  if (!file) return;
  const request = ++state.request;
  elements.error.hidden = true;
  if (state.maxUpload && file.size > state.maxUpload) {
    elements.result.hidden = true;
    elements.status.textContent = "";
    showError(`${file.name} was not sent: it is ${megabytes(file.size)}, the server accepts up to ${megabytes(state.maxUpload)}.`);
    return;
  }
  elements.status.textContent = `Captioning ${file.name}…`;
  document.body.classList.add("busy");
  const form = new FormData();
  form.append("image", file, file.name);
  const query = new URLSearchParams({
    beam_size: elements.beam.value,
    guidance: elements.guidance.checked,
    templates: elements.templates.checked,
    detector: elements.detector.checked,
    repeat_words: elements.repeatWords.checked,
  });
  for (const word of elements.mention.value.split(/[\s,]+/).filter(Boolean)) query.append("mention", word);
  let response;
  let body;
  try {
    response = await fetch(`api/caption?${query}`, { method: "POST", body: form });
    body = await response.json().catch(() => ({ error: `the server answered ${response.status} ${response.statusText}` }));
  } catch (error) {
    response = null;
  } finally {
    if (request === state.request) document.body.classList.remove("busy");
  }
  if (request !== state.request) return; // a newer photo was chosen meanwhile
  elements.status.textContent = "";
  if (!response || !response.ok) {
    elements.result.hidden = true;
    if (!response) {
      showError(`${file.name} was not sent: the server cannot be reached.`);
    } else if (response.status === 503) {
      const retry = response.headers.get("Retry-After");
      showError(`${file.name} was not captioned: ${body.error}${retry ? ` (retry in ${retry} s)` : ""}.`);
    } else {
      showError(`${file.name} was rejected: ${body.error}`);
    }
    return;
  }
  state.file = file; // captioned again when the beam size changes
  state.result = body;
  state.pinned = null;
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  elements.figure.classList.remove("no-photo");
  elements.photo.src = state.photoUrl;
  renderCaption(body);
  renderBoxes(body);
  drawAttention(null);
  elements.result.hidden = false;
}

function firstFile(list) {
  return list && list.length ? list[0] : null;
}

elements.file.addEventListener("change", () => {
  caption(firstFile(elements.file.files));
  elements.file.value = ""; // choosing the same file again still triggers a caption
});
elements.beam.addEventListener("change", () => caption(state.file));
// Templates and the detector's words join the labels' guidance: without it there are none to offer.
function enableGuidanceOptions() {
  elements.templates.disabled = !elements.guidance.checked;
  elements.detector.disabled = !elements.guidance.checked || !state.detectorLoaded;
}

elements.guidance.addEventListener("change", () => {
  enableGuidanceOptions();
  caption(state.file);
});
elements.templates.addEventListener("change", () => caption(state.file));
elements.detector.addEventListener("change", () => caption(state.file));
elements.repeatWords.addEventListener("change", () => caption(state.file));
elements.showBoxes.addEventListener("change", showBoxes);
elements.mention.addEventListener("change", () => caption(state.file)); // on Enter or leaving the box
// Small photos are shown larger and large ones smaller: as wide as the column, at most 70% of the window high.
function fitPhoto() {
  const photo = elements.photo;
  if (!photo.naturalWidth) return;
  const width = elements.figure.clientWidth;
  const height = 0.7 * window.innerHeight;
  const scale = Math.min(width / photo.naturalWidth, height / photo.naturalHeight);
  photo.style.width = `${Math.floor(photo.naturalWidth * scale)}px`; // the height follows
  placeLabels();
}

elements.photo.addEventListener("load", fitPhoto);
window.addEventListener("resize", fitPhoto);
elements.photo.addEventListener("error", () => {
  // Some formats the model reads (e.g. TIFF) are not shown by every browser: keep the caption anyway.
  if (elements.photo.getAttribute("src")) elements.figure.classList.add("no-photo");
});

// A photo dropped anywhere on the page is captioned (and never opened by the browser instead).
for (const type of ["dragenter", "dragover"]) {
  document.addEventListener(type, (event) => {
    event.preventDefault();
    elements.drop.classList.add("dragging");
  });
}
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) elements.drop.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  elements.drop.classList.remove("dragging");
  caption(firstFile(event.dataTransfer && event.dataTransfer.files));
});
document.addEventListener("paste", (event) => {
  const file = firstFile(event.clipboardData && event.clipboardData.files);
  if (file) caption(file);
});

fetch("api/health")
  .then((response) => response.json())
  .then((health) => {
    state.maxUpload = health.max_upload_bytes;
    state.detectorLoaded = Boolean(health.detector);
    enableGuidanceOptions();
    elements.detector.parentElement.title = health.detector ? "" : "this server runs without a COCO detector";
    const detector = health.detector ? `${health.detector} COCO detector` : "no COCO detector";
    elements.health.textContent = `Model loaded · ${decoderName(health.decoder)} · ${health.encoder_precision} encoder · ${detector} · ${health.grid_size}×${health.grid_size} attention grid · photos up to ${megabytes(health.max_upload_bytes)}`;
  })
  .catch(() => {
    elements.health.textContent = "The model server is not reachable.";
  });
