// The feature map: a canvas of every feature of one hook of a release (points from the JSON in
// #map-data, placed by UMAP at precompute). Pan by dragging, zoom with the wheel, hover for label
// and density, click to open the feature. A uniform grid over the points finds the one under the
// mouse without scanning them all; drawing is one pass of fillRect per frame.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("map-data").textContent);
  const canvas = document.getElementById("map");
  const tip = document.getElementById("map-tip");
  const search = document.getElementById("map-search");
  const found = document.getElementById("map-found");
  const ctx = canvas.getContext("2d");
  const n = data.index.length;
  const COLOURS = ["#d9480f", "#1971c2", "#2f9e44", "#9c36b5", "#e8590c", "#0c8599", "#f08c00", "#5c940d"];
  const colour = (s) => COLOURS[s % COLOURS.length];
  const shown = data.saes.map(() => true);
  let lit = null; // Uint8Array of matches while a search is typed
  let view = { scale: 1, x: 0, y: 0 }; // screen = (point * size) * scale + offset
  let size = 1, hover = -1, frame = 0;

  document.querySelectorAll(".swatch").forEach((el) => { el.style.background = colour(+el.dataset.sae); });

  // Grid index over [0, 1]^2.
  const G = 128;
  const cells = Array.from({ length: G * G }, () => []);
  const cellOf = (v) => Math.min(G - 1, Math.max(0, Math.floor(v * G)));
  for (let i = 0; i < n; i++) cells[cellOf(data.y[i]) * G + cellOf(data.x[i])].push(i);

  function resize() {
    const ratio = window.devicePixelRatio || 1;
    const rect = canvas.getBoundingClientRect();
    canvas.width = rect.width * ratio;
    canvas.height = rect.height * ratio;
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    size = Math.min(rect.width, rect.height) - 20;
    if (!frame) view = { scale: 1, x: (rect.width - size) / 2, y: 10 };
    draw();
  }

  const sx = (i) => data.x[i] * size * view.scale + view.x;
  const sy = (i) => data.y[i] * size * view.scale + view.y;

  function draw() {
    frame++;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    ctx.clearRect(0, 0, w, h);
    const r = Math.max(1.5, Math.min(4, 1.5 * Math.sqrt(view.scale)));
    ctx.globalAlpha = lit ? 0.12 : 0.7;
    for (let s = 0; s < data.saes.length; s++) {
      if (!shown[s]) continue;
      ctx.fillStyle = colour(s);
      for (let i = 0; i < n; i++) {
        if (data.sae[i] !== s) continue;
        const x = sx(i), y = sy(i);
        if (x < -5 || y < -5 || x > w + 5 || y > h + 5) continue;
        ctx.fillRect(x - r / 2, y - r / 2, r, r);
      }
    }
    if (lit) {
      ctx.globalAlpha = 1;
      for (let i = 0; i < n; i++) {
        if (!lit[i] || !shown[data.sae[i]]) continue;
        ctx.fillStyle = colour(data.sae[i]);
        ctx.beginPath(); ctx.arc(sx(i), sy(i), r + 2.5, 0, 2 * Math.PI); ctx.fill();
      }
    }
    if (hover >= 0) {
      ctx.globalAlpha = 1; ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(sx(hover), sy(hover), r + 4, 0, 2 * Math.PI); ctx.stroke();
    }
  }

  let pending = false;
  function redraw() { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(); }); } }

  function nearest(mx, my) {
    const px = (mx - view.x) / (size * view.scale), py = (my - view.y) / (size * view.scale);
    const reach = 8 / (size * view.scale); // 8 screen pixels in map units
    let best = -1, bestD = Infinity;
    for (let cy = cellOf(py - reach); cy <= cellOf(py + reach); cy++) {
      for (let cx = cellOf(px - reach); cx <= cellOf(px + reach); cx++) {
        for (const i of cells[cy * G + cx]) {
          if (!shown[data.sae[i]]) continue;
          const d = (sx(i) - mx) ** 2 + (sy(i) - my) ** 2;
          if (d < bestD && d <= 64) { best = i; bestD = d; }
        }
      }
    }
    return best;
  }

  const url = (i) => "/saes/" + encodeURIComponent(data.saes[data.sae[i]].name) + "/features/" + data.index[i];

  function showTip(i, mx, my) {
    if (i < 0) { tip.style.display = "none"; return; }
    const sae = data.saes[data.sae[i]];
    tip.textContent = sae.d_sae.toLocaleString() + ":" + data.index[i] + " · " + (data.label[i] || "unlabelled") +
      " · density " + (100 * data.density[i]).toPrecision(3) + "%";
    tip.dataset.sae = sae.name; tip.dataset.index = data.index[i];
    tip.style.left = mx + 14 + "px"; tip.style.top = my + 14 + "px"; tip.style.display = "block";
  }

  let drag = null, moved = false;
  canvas.addEventListener("pointerdown", (e) => { drag = { x: e.offsetX, y: e.offsetY }; moved = false; canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointermove", (e) => {
    if (drag) {
      const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 2) moved = true;
      view.x += dx; view.y += dy; drag = { x: e.offsetX, y: e.offsetY };
      redraw();
      return;
    }
    const i = nearest(e.offsetX, e.offsetY);
    canvas.style.cursor = i >= 0 ? "pointer" : "grab";
    if (i !== hover) { hover = i; redraw(); }
    showTip(i, e.offsetX, e.offsetY);
  });
  canvas.addEventListener("pointerup", (e) => {
    drag = null;
    if (!moved) { const i = nearest(e.offsetX, e.offsetY); if (i >= 0) window.location.href = url(i); }
  });
  canvas.addEventListener("pointerleave", () => { hover = -1; showTip(-1); redraw(); });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const k = Math.exp(-e.deltaY * 0.0015);
    const scale = Math.min(400, Math.max(0.5, view.scale * k));
    const f = scale / view.scale;
    view.x = e.offsetX - (e.offsetX - view.x) * f; view.y = e.offsetY - (e.offsetY - view.y) * f; view.scale = scale;
    redraw();
  }, { passive: false });

  const lower = data.label.map((l) => (l || "").toLowerCase());
  search.addEventListener("input", () => {
    const q = search.value.trim().toLowerCase();
    if (!q) { lit = null; found.textContent = ""; redraw(); return; }
    lit = new Uint8Array(n);
    let count = 0;
    for (let i = 0; i < n; i++) if (lower[i].includes(q)) { lit[i] = 1; count++; }
    found.textContent = count + " match" + (count === 1 ? "" : "es");
    redraw();
  });
  document.querySelectorAll(".map-width").forEach((box) => box.addEventListener("change", () => { shown[+box.value] = box.checked; redraw(); }));
  window.addEventListener("resize", resize);
  resize();
  canvas.dataset.ready = "1"; // for tests: the map has drawn
  window.saescopeMap = { screenOf: (i) => [sx(i), sy(i)], find: (sae, index) => { for (let i = 0; i < n; i++) if (data.saes[data.sae[i]].name === sae && data.index[i] === index) return i; return -1; } };
})();
