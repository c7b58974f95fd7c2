// Decode the detector's output in JavaScript: what `decode` in model.py does, for the
// TensorFlow.js export (`"artifact": [{"processor": "tfjs", "target": "web"}]`).
//
//   const model = await tf.loadLayersModel("web/model.json");
//   const input = tf.browser.fromPixels(img).resizeBilinear([S, S]).toFloat().div(255).expandDims(0);
//   const out = model.predict(input);                       // [1, S/4, S/4, classes + 4]
//   const dets = decode(await out.data(), out.shape[1], out.shape[2], categories.length,
//                       { scaleX: img.width / S, scaleY: img.height / S, width: img.width, height: img.height });
//   // [{ label: 0, score: 0.97, box: [x, y, w, h] }, ...] in the image's pixels (label: index into categories)
//
// The grid cell holds per class a centre probability, then the centre's offset in the cell
// (x, y) and log width and height in cells; stride 4. Peaks are local maxima (3x3) at or
// above the threshold, at most maxDetections, then per-class non-maximum suppression.
"use strict";

const STRIDE = 4;

function iou(a, b) {
  const x0 = Math.max(a[0], b[0]), y0 = Math.max(a[1], b[1]);
  const x1 = Math.min(a[0] + a[2], b[0] + b[2]), y1 = Math.min(a[1] + a[3], b[1] + b[3]);
  const inter = Math.max(0, x1 - x0) * Math.max(0, y1 - y0);
  const union = a[2] * a[3] + b[2] * b[3] - inter;
  return union > 0 ? inter / union : 0;
}

function decode(data, gridH, gridW, numClasses, options = {}) {
  const { scaleX = 1, scaleY = 1, threshold = 0.3, maxDetections = 100, nmsIou = 0.5, width, height } = options;
  const depth = numClasses + 4;
  const at = (y, x, c) => data[(y * gridW + x) * depth + c];
  const peaks = [];
  for (let y = 0; y < gridH; y++) {
    for (let x = 0; x < gridW; x++) {
      for (let c = 0; c < numClasses; c++) {
        const v = at(y, x, c);
        if (v < threshold) continue;
        let isMax = true;
        for (let dy = -1; dy <= 1 && isMax; dy++) {
          for (let dx = -1; dx <= 1; dx++) {
            const yy = y + dy, xx = x + dx;
            if (yy >= 0 && yy < gridH && xx >= 0 && xx < gridW && at(yy, xx, c) > v) { isMax = false; break; }
          }
        }
        if (isMax) peaks.push({ y, x, c, score: v, order: peaks.length });
      }
    }
  }
  peaks.sort((a, b) => b.score - a.score || a.order - b.order);
  const clip = (v) => Math.max(-10, Math.min(10, v));
  const candidates = [];
  for (const p of peaks.slice(0, maxDetections)) {
    const w = Math.exp(clip(at(p.y, p.x, numClasses + 2))) * STRIDE;
    const h = Math.exp(clip(at(p.y, p.x, numClasses + 3))) * STRIDE;
    const cx = (p.x + at(p.y, p.x, numClasses)) * STRIDE, cy = (p.y + at(p.y, p.x, numClasses + 1)) * STRIDE;
    let x0 = (cx - w / 2) * scaleX, y0 = (cy - h / 2) * scaleY, x1 = (cx + w / 2) * scaleX, y1 = (cy + h / 2) * scaleY;
    if (width !== undefined) { x0 = Math.max(0, x0); x1 = Math.min(width, x1); }
    if (height !== undefined) { y0 = Math.max(0, y0); y1 = Math.min(height, y1); }
    if (x1 > x0 && y1 > y0) candidates.push({ label: p.c, score: p.score, box: [x0, y0, x1 - x0, y1 - y0] });
  }
  const kept = [];
  for (let c = 0; c < numClasses; c++) {
    const mine = candidates.filter((d) => d.label === c);  // already by score, ties in grid order
    const suppressed = new Array(mine.length).fill(false);
    for (let i = 0; i < mine.length; i++) {
      if (suppressed[i]) continue;
      kept.push(mine[i]);
      for (let j = i + 1; j < mine.length; j++) if (iou(mine[i].box, mine[j].box) > nmsIou) suppressed[j] = true;
    }
  }
  kept.sort((a, b) => b.score - a.score);
  return kept;
}

if (typeof module !== "undefined") module.exports = { decode, iou, STRIDE };
