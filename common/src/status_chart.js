// Shared by the node's and the scheduler's status pages (src/http_status.rs,
// exec/src/scheduler/http.rs): number formats, the fields marked data-key, line charts drawn
// as inline SVG, and polling /status. No framework and nothing loaded from elsewhere:
// nodes often have no internet access.
"use strict";

function fmt(kind, value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  switch (kind) {
    case "bytes": {
      const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
      let v = value, i = 0;
      while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
      return (i ? v.toFixed(1) : v.toFixed(0)) + " " + units[i];
    }
    case "byte_rate": return fmt("bytes", value) + "/s";
    case "rate": return value.toFixed(value < 10 ? 2 : 0) + "/s";
    case "ratio": return (value * 100).toFixed(1) + " %";
    case "seconds":
      if (value < 1) return (value * 1000).toFixed(0) + " ms";
      if (value < 120) return value.toFixed(1) + " s";
      return fmt("uptime", value);
    case "uptime": {
      let s = Math.floor(value);
      const d = Math.floor(s / 86400); s -= d * 86400;
      const h = Math.floor(s / 3600); s -= h * 3600;
      const m = Math.floor(s / 60); s -= m * 60;
      return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + s + "s";
    }
    default:
      return typeof value === "number"
        ? (Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(2))
        : String(value);
  }
}

function lookup(data, path) {
  return path.split(".").reduce((o, k) => (o === null || o === undefined ? undefined : o[k]), data);
}

// Every element with data-key="a.b.c" shows that value of the status, formatted as its
// data-format says; the server rendered the same text, so without JavaScript the page
// shows the numbers as they were when it loaded.
function fillFields(data) {
  document.querySelectorAll("[data-key]").forEach((el) => {
    const value = lookup(data, el.dataset.key);
    if (value !== undefined) el.textContent = fmt(el.dataset.format, value);
  });
}

const COLORS = ["#2f6fde", "#e0762a", "#2a9d4b", "#b63dbd", "#c9343c", "#7a7a7a", "#1a9fb0"];

// Draws `series` ([{name, values}], values aligned with `times` in ms, null for a gap)
// into the <svg> element, and records how many points it drew in data-points.
function drawChart(svg, times, series, kind) {
  const W = 560, H = 170, L = 70, R = 10, T = 22, B = 20;
  let max = 0, points = 0;
  series.forEach((s) => s.values.forEach((v) => { if (v !== null && v > max) max = v; }));
  if (kind === "ratio") max = 1;
  if (!(max > 0)) max = 1;
  const t0 = times.length ? times[0] : 0;
  const t1 = times.length ? times[times.length - 1] : 1;
  const span = Math.max(t1 - t0, 1);
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const parts = [];
  [0, 0.5, 1].forEach((f) => {
    const yy = y(max * f).toFixed(1);
    parts.push(`<line x1="${L}" x2="${W - R}" y1="${yy}" y2="${yy}" stroke="#ddd"/>`);
    parts.push(`<text x="${L - 4}" y="${yy}" text-anchor="end" dominant-baseline="middle" font-size="10" fill="#555">${fmt(kind, max * f)}</text>`);
  });
  const minutes = Math.round(span / 60000);
  parts.push(`<text x="${L}" y="${H - 4}" font-size="10" fill="#555">${times.length ? "−" + (minutes || "<1") + " min" : "no samples yet"}</text>`);
  parts.push(`<text x="${W - R}" y="${H - 4}" text-anchor="end" font-size="10" fill="#555">now</text>`);
  let legendX = L;
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const gap = (v) => v === null || v === undefined;
    let d = "", pen = false;
    s.values.forEach((v, j) => {
      if (gap(v) || j >= times.length) { pen = false; return; }
      const px = x(times[j]).toFixed(1), py = y(v).toFixed(1);
      d += (pen ? "L" : "M") + px + " " + py + " ";
      // A point between two gaps draws no line: mark it.
      if (!pen && (j + 1 >= s.values.length || gap(s.values[j + 1]))) {
        parts.push(`<circle cx="${px}" cy="${py}" r="2.5" fill="${color}"/>`);
      }
      pen = true;
      points++;
    });
    if (d) parts.push(`<path d="${d}" fill="none" stroke="${color}" stroke-width="1.8"/>`);
    parts.push(`<rect x="${legendX}" y="4" width="10" height="10" fill="${color}"/>`);
    parts.push(`<text x="${legendX + 14}" y="13" font-size="11">${escapeHtml(s.name)}</text>`);
    legendX += 24 + 7 * s.name.length;
  });
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.innerHTML = parts.join("");
  svg.setAttribute("data-points", String(points));
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// The rows of the workers table (src/http_status.rs renders the same at load).
function renderWorkers(workers) {
  const body = document.getElementById("workers-body");
  if (!body) return;
  body.innerHTML = workers.map((w) =>
    `<tr><td><code>${escapeHtml(w.id)}</code>${w.draining ? " (draining)" : ""}</td>` +
    `<td class="n">${w.running.length} / ${w.max_inflight}</td>` +
    `<td>${w.running.map((t) => `<code>${escapeHtml(t.action.slice(0, 12))}</code> ${fmt("seconds", t.running_seconds)}`).join("<br>") || "idle"}</td></tr>`
  ).join("") || `<tr><td colspan="3">no workers connected</td></tr>`;
}

// The rows of the recent operations table, newest first.
function renderRecent(recent) {
  const body = document.getElementById("recent-body");
  if (!body || !recent) return;
  const time = (ms) => new Date(ms).toISOString().slice(11, 19) + " UTC";
  body.innerHTML = recent.map((o) =>
    `<tr><td>${time(o.finished_unix_ms)}</td><td><code>${escapeHtml(o.action.slice(0, 16))}</code></td>` +
    `<td><code>${escapeHtml(o.worker)}</code></td><td title="${escapeHtml(o.message)}">${escapeHtml(o.outcome)}</td>` +
    `<td class="n">${o.exit_code === null ? "–" : o.exit_code}</td><td class="n">${fmt("seconds", o.total_seconds)}</td>` +
    `<td class="n">${o.execution_seconds === null ? "–" : fmt("seconds", o.execution_seconds)}</td></tr>`
  ).join("") || `<tr><td colspan="7">none yet</td></tr>`;
}

// Renders the status embedded in the page at once, then fetches /status every few
// seconds; body[data-updates] counts the fetches applied.
function follow(apply) {
  const initial = document.getElementById("initial-status");
  if (initial) apply(JSON.parse(initial.textContent));
  let updates = 0;
  const note = document.getElementById("live");
  const tick = () => {
    fetch("status", { cache: "no-store", credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status))))
      .then((data) => {
        apply(data);
        updates++;
        document.body.setAttribute("data-updates", String(updates));
        if (note) note.textContent = "live, updated " + new Date().toLocaleTimeString();
      })
      .catch((error) => { if (note) note.textContent = "update failed: " + error.message; })
      .finally(() => setTimeout(tick, 3000));
  };
  setTimeout(tick, 3000);
}
