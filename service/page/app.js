// The page: send an image to /predict once, then draw and list its detections at the slider's
// minimum score (moving the slider re-filters; nothing is sent again). The overlay is drawn as
// service/draw.py draws /render's: masks blended half-and-half in a per-class colour (lowest
// score first), then boxes and "name score" labels.
"use strict";

const MASK_ALPHA = 0.5;
const GOLDEN_RATIO = 0.618033988749895;
const $ = (id) => document.getElementById(id);
let current = null; // {image, detections: [{...detection, runs, area}], width, height}

// As service/draw.class_colour: golden-ratio hues, HSV (h, 0.85, 0.95) to RGB bytes.
function classColour(categoryId) {
  const h = (categoryId * GOLDEN_RATIO) % 1.0, s = 0.85, v = 0.95;
  const i = Math.floor(h * 6.0), f = h * 6.0 - i;
  const p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  const rgb = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return rgb.map((x) => Math.floor(x * 255));
}

// COCO's compressed RLE string (pycocotools' rleFrString) to run lengths, column-major,
// starting with a run of unset pixels.
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function maskArea(counts) {
  let area = 0;
  for (let i = 1; i < counts.length; i += 2) area += counts[i];
  return area;
}

function lineWidth(height, width) {
  return Math.max(1, Math.round(Math.min(height, width) / 400));
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function visible() {
  const minimum = Number($("score").value);
  return current.detections.filter((d) => d.score >= minimum);
}

function draw() {
  const canvas = $("overlay");
  const { width, height } = current;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(current.image, 0, 0, width, height);
  const shown = visible();
  const order = shown.map((d, i) => i).sort((a, b) => shown[a].score - shown[b].score);
  const pixels = ctx.getImageData(0, 0, width, height);
  const data = pixels.data;
  for (const i of order) {
    const d = shown[i];
    if (!d.counts) continue;
    const colour = classColour(d.category_id);
    let p = 0;
    d.counts.forEach((run, r) => {
      if (r % 2 === 1) {
        for (let j = p; j < p + run; j++) {
          const at = ((j % height) * width + Math.floor(j / height)) * 4;
          for (let c = 0; c < 3; c++) {
            data[at + c] = Math.floor(data[at + c] * (1 - MASK_ALPHA) + colour[c] * MASK_ALPHA + 0.5);
          }
        }
      }
      p += run;
    });
  }
  ctx.putImageData(pixels, 0, 0);
  const thickness = lineWidth(height, width);
  const fontPx = Math.max(12, Math.round(Math.min(height, width) / 45));
  ctx.font = `${fontPx}px sans-serif`;
  ctx.textBaseline = "top";
  for (const i of order) {
    const d = shown[i];
    const [x1, y1, x2, y2] = d.bbox;
    const colour = `rgb(${classColour(d.category_id).join(",")})`;
    ctx.strokeStyle = colour;
    ctx.lineWidth = thickness;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const label = `${d.category_name} ${d.score.toFixed(2)}`;
    const bandH = fontPx + 4, top = y1 - bandH >= 0 ? y1 - bandH : y1;
    ctx.fillStyle = colour;
    ctx.fillRect(x1, top, ctx.measureText(label).width + 4, bandH);
    ctx.fillStyle = "#000";
    ctx.fillText(label, x1 + 2, top + 2);
  }
  const rows = shown.map((d) => {
    const tr = document.createElement("tr");
    const cells = [d.category_name, d.score.toFixed(3), d.bbox.map((v) => v.toFixed(1)).join(", "),
                   d.counts ? String(d.area) : "-"];
    cells.forEach((text, c) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (c === 0) { td.className = "swatch"; td.style.borderLeftColor = `rgb(${classColour(d.category_id).join(",")})`; }
      tr.appendChild(td);
    });
    return tr;
  });
  $("detections").querySelector("tbody").replaceChildren(...rows);
  $("score-value").textContent = Number($("score").value).toFixed(2);
  setStatus(`${shown.length} of ${current.detections.length} detections at score ≥ ${Number($("score").value).toFixed(2)}.`);
  canvas.dataset.ready = "true";
}

async function loadImage(file) {
  const url = URL.createObjectURL(file);
  const image = new Image();
  image.src = url;
  await image.decode();
  return image;
}

async function detect(file) {
  $("overlay").dataset.ready = "false";
  setStatus(`Detecting in ${file.name}…`);
  const headers = { "Content-Type": file.type || "application/octet-stream" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  try {
    const [image, response] = await Promise.all([loadImage(file), fetch("predict", { method: "POST", headers, body: file })]);
    const body = await response.json();
    if (!response.ok) {
      const error = body.error || {};
      setStatus(`HTTP ${response.status} ${error.code || ""}: ${error.message || JSON.stringify(body)}`, true);
      return;
    }
    const detections = body.detections.map((d) => {
      const counts = d.segmentation ? rleCounts(d.segmentation.counts) : null;
      return { ...d, counts, area: counts ? maskArea(counts) : null };
    });
    current = { image, detections, width: body.image.width, height: body.image.height };
    $("result").hidden = false;
    draw();
  } catch (error) {
    setStatus(`Failed: ${error}`, true);
  }
}

$("file").addEventListener("change", (event) => {
  if (event.target.files.length) detect(event.target.files[0]);
});
$("score").addEventListener("input", () => { if (current) draw(); });
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) detect(event.dataTransfer.files[0]);
});
