// The OSD Serve dashboard: polls /dashboard/data every few seconds and draws SVG charts.
"use strict";
const COLORS = ["#1c2430", "#4a90d9", "#e08a2e", "#3aa655", "#9b59b6", "#d9534f", "#16a2b8", "#8c6d31"];
const MARKERS = { publish: "#3aa655", rollback: "#d9534f", reject: "#e08a2e" };
let range = "1h";
const svgNS = "http://www.w3.org/2000/svg";

function el(tag, attrs, parent, text) {
  const node = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  parent.appendChild(node);
  return node;
}

// lines: [{name, color, points: [[t, y]]}]; markers: registry events; x range [t0, t1].
function chart(svg, lines, markers, t0, t1, yMax) {
  svg.replaceChildren();
  const W = svg.clientWidth || 500, H = svg.clientHeight || 200, L = 40, B = 18, T = 6;
  const top = yMax ?? Math.max(1e-9, ...lines.flatMap(l => l.points.map(p => p[1])));
  const x = t => L + (W - L - 6) * (t - t0) / (t1 - t0);
  const y = v => T + (H - T - B) * (1 - v / top);
  for (const f of [0, 0.5, 1]) {
    el("line", { x1: L, x2: W - 6, y1: y(top * f), y2: y(top * f), stroke: "#e3e6ea" }, svg);
    el("text", { x: 2, y: y(top * f) + 4, "font-size": 10, fill: "#6b7685" }, svg, (top * f).toPrecision(2));
  }
  el("text", { x: L, y: H - 4, "font-size": 10, fill: "#6b7685" }, svg, new Date(t0 * 1000).toLocaleTimeString());
  el("text", { x: W - 60, y: H - 4, "font-size": 10, fill: "#6b7685" }, svg, new Date(t1 * 1000).toLocaleTimeString());
  for (const m of markers) {
    const g = el("g", { class: "marker marker-" + m.event }, svg);
    el("line", { x1: x(m.time), x2: x(m.time), y1: T, y2: H - B, stroke: MARKERS[m.event] || "#999", "stroke-dasharray": "4 3", "stroke-width": 2 }, g);
    const gate = m.gate_acceptance != null ? `, gate acceptance ${m.gate_acceptance.toFixed(3)}` : "";
    el("title", {}, g, `${m.event} v${m.version}${m.previous != null ? " (from v" + m.previous + ")" : ""}${gate}${m.reason ? ": " + m.reason : ""}`);
  }
  for (const line of lines) {
    if (!line.points.length) continue;
    const d = line.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
    el("path", { d, fill: "none", stroke: line.color, "stroke-width": 1.8, class: "series" }, svg);
    for (const p of line.points) {
      const c = el("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.2, fill: line.color, class: "point" }, svg);
      el("title", {}, c, `${line.name}: ${p[1].toFixed(3)} at ${new Date(p[0] * 1000).toLocaleTimeString()}`);
    }
  }
}

function legend(id, lines) {
  document.getElementById(id).innerHTML = lines.map(l => `<span style="color:${l.color}">● ${l.name}</span>`).join("");
}

function bars(svg, values) {
  svg.replaceChildren();
  const W = svg.clientWidth || 500, H = svg.clientHeight || 200, n = Math.max(values.length, 1), w = (W - 40) / n;
  values.forEach((v, i) => {
    if (v == null) return;
    const h = (H - 24) * v;
    const r = el("rect", { x: 40 + i * w + 4, y: H - 18 - h, width: w - 8, height: h, fill: "#4a90d9", class: "point" }, svg);
    el("title", {}, r, `position ${i + 1}: ${v.toFixed(3)}`);
    el("text", { x: 40 + i * w + w / 2 - 12, y: H - 22 - h, "font-size": 11 }, svg, v.toFixed(2));
    el("text", { x: 40 + i * w + w / 2 - 4, y: H - 4, "font-size": 10 }, svg, i + 1);
  });
}

const series = (rows, key) => rows.filter(r => r[key] != null).map(r => [r.t, r[key]]);

// The x range: the chosen range, cut to begin where its data begin (a young deployment fills the width).
function timeRange(data) {
  const start = data.now - { "5m": 300, "1h": 3600, "24h": 86400 }[data.range];
  const first = Math.min(...data.overall.map(r => r.t), ...data.events.map(e => e.time));
  return [Number.isFinite(first) ? Math.max(start, first - data.bin_seconds) : start, data.now];
}

// A trainer status value as text: gate and watch decisions and the backlog in words.
function describe(key, value) {
  if (value == null) return "-";
  if (key === "backlog") return `${value.length} in the stream, ${value.pending} pending, ${value.lag ?? "?"} not yet read`;
  if (key === "history") return value.map(h => h.kind === "gate"
    ? `step ${h.step}: ${h.publish ? "publish" : "hold"}, ${h.reason} (candidate ${h.candidate?.toFixed(3)}, live ${h.live?.toFixed(3)}, ${h.positions} positions${h.replay ? `, replay rounds: ${h.replay.scores.length - 1}` : ""})`
    : `v${h.version}: ${h.action}, ${h.reason}`).reverse().join("<br>");
  if (key === "domains") return Object.entries(value).map(([d, a]) => `${d}: v${a.live_version}, step ${a.step}, ${a.trained_traces} of ${a.seen} traces`).join("<br>") || "none yet";
  if (key === "router") return `held-out accuracy ${value.accuracy.toFixed(3)} over ${value.domains.join(", ")} (${value.held_out} prompts)`;
  if (typeof value === "number") return Number.isInteger(value) ? value : value.toFixed(4);
  return Array.isArray(value) ? value.join(", ") || "none" : value;
}

function render(data) {
  const [t0, t1] = timeRange(data);
  const ev = data.events;
  const acc = [{ name: "overall", color: COLORS[0], points: series(data.overall, "acceptance") }]
    .concat(Object.entries(data.by_domain).map(([d, rows], i) => ({ name: d, color: COLORS[1 + i % 7], points: series(rows, "acceptance") })));
  chart(document.getElementById("acceptance"), acc, ev, t0, t1, 1);
  legend("acceptance-legend", acc);
  const ver = Object.entries(data.by_version).map(([v, rows], i) => ({ name: v, color: COLORS[(i + 1) % 8], points: series(rows, "acceptance") }));
  chart(document.getElementById("versions-chart"), ver, ev, t0, t1, 1);
  legend("versions-legend", ver);
  const tau = [{ name: "τ (tokens per step)", color: COLORS[1], points: series(data.overall, "mean_accepted_length") },
    { name: "speedup vs AR, τ / (k·c + 1)", color: COLORS[3], points: series(data.overall, "speedup") }];
  chart(document.getElementById("tau"), tau, ev, t0, t1);
  legend("tau-legend", tau);
  const s = data.speculation;
  const x = data.suffix, rate = x && x.hit_rate != null ? `, ${(100 * x.hit_rate).toFixed(0)}% of lookups matched` : "";
  document.getElementById("speculation").textContent = (s ? `(k = ${s.k.toFixed(1)}, measured c = ${s.c.toFixed(3)})` : "")
    + (x ? ` suffix index: ${x.documents} requests, ${x.tokens} tokens${rate}` : "");
  const prop = Object.entries(data.proposers).map(([p, v], i) => ({
    name: v.acceptance == null ? p : `${p} (acceptance ${v.acceptance.toFixed(2)})`, color: COLORS[(i + 2) % 8], points: series(v.share, "share") }));
  chart(document.getElementById("proposers"), prop, ev, t0, t1, 1);
  legend("proposers-legend", prop);
  chart(document.getElementById("throughput"), [{ name: "tokens/s", color: COLORS[3], points: series(data.overall, "tokens_per_s") }], ev, t0, t1);
  const lat = ["ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"].map((k, i) => ({ name: k, color: COLORS[i + 1], points: series(data.overall, k) }));
  chart(document.getElementById("latency"), lat, ev, t0, t1);
  legend("latency-legend", lat);
  const live = data.versions.find(v => v.status === "live" && v.domain === data.domain);
  const label = live ? live.label : Object.keys(data.positions).slice(-1)[0];
  bars(document.getElementById("positions"), data.positions[label] || []);
  document.getElementById("alerts").innerHTML = data.alerts.length
    ? data.alerts.map(a => `<div class="alert" data-kind="${a.kind}"><b>${a.kind}</b> in <b>${a.domain}</b>: ${a.message}${a.delay_seconds != null ? ` (detected ${a.delay_seconds} s after onset)` : ""}</div>`).join("")
    : "none";
  const t = data.trainer;
  document.getElementById("trainer").innerHTML = t
    ? ["state", "activity", "step", "loss", "trained_traces", "held_out_positions", "skipped_traces", "untrained", "buffer", "backlog", "live_version", "prioritised_domains", "domains", "router", "history"]
        .filter(k => k in t).map(k => `<tr data-key="${k}"><th>${k === "history" ? "last decisions" : k.replaceAll("_", " ")}</th><td>${describe(k, t[k])}</td></tr>`).join("")
    : "<tr><td class='muted'>no trainer attached</td></tr>";
  const liveAcc = Object.fromEntries(Object.entries(data.by_version).map(([v, rows]) => [v, rows.length ? rows[rows.length - 1].acceptance : null]));
  document.getElementById("versions").innerHTML = "<tr><th>version</th><th>parent</th><th>created</th><th>gate acceptance</th><th>live acceptance</th><th>status</th><th></th></tr>" +
    data.versions.map(v => `<tr><td>${v.label}</td><td>${v.parent ?? ""}</td><td>${new Date(v.created * 1000).toLocaleString()}</td>` +
      `<td>${v.gate_acceptance?.toFixed(3) ?? ""}</td><td>${liveAcc[v.label]?.toFixed(3) ?? ""}</td><td>${v.status}</td>` +
      `<td>${v.status === "live" && v.domain === data.domain ? '<button id="rollback">roll back</button>' : ""}</td></tr>`).join("");
  const button = document.getElementById("rollback");
  if (button) button.onclick = rollback;
  document.getElementById("status").textContent = data.store === "ok" ? "" : `(store: ${data.store})`;
}

async function rollback() {
  const message = document.getElementById("message");
  if (!confirm("Roll back the live draft version to its parent?")) return;
  const token = document.getElementById("token").value;
  const response = await fetch("/admin/rollback", {
    method: "POST", headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` }, body: "{}",
  });
  const body = await response.json().catch(() => ({}));
  message.textContent = response.ok ? `rolled back to v${body.version}` : `refused (${response.status}): ${body.error?.message ?? body.detail ?? ""}`;
  message.className = response.ok ? "" : "alert";
  refresh();
}

async function refresh() {
  try {
    const response = await fetch(`/dashboard/data?range=${range}`);
    render(await response.json());
  } catch (err) {
    document.getElementById("status").textContent = `(unreachable: ${err})`;
  }
}

for (const b of document.querySelectorAll("header button")) {
  b.onclick = () => {
    range = b.dataset.range;
    document.querySelectorAll("header button").forEach(x => x.classList.toggle("on", x === b));
    refresh();
  };
}
refresh();
setInterval(refresh, 3000);
