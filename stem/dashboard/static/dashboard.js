// stem dashboard: reloads the overview's live part and draws the throughput chart.
// Written for this package; no library, nothing fetched from elsewhere.  Rates are
// differences between two heartbeats of a worker (its counters and when it wrote
// them), so the server keeps no history: the chart covers the time this page is open.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) { return; }
  var chart = document.getElementById("chart");
  var WINDOW_MS = 5 * 60 * 1000;
  var refresh = parseInt(live.getAttribute("data-refresh"), 10) || 2000;
  var beats = {};      // worker id -> {seen, succeeded, failed, rate: [ok/s, failed/s]}
  var queues = {};     // queue -> {t, ready, dead, rate: [ready Δ/s, dead Δ/s]}
  var history = [];    // [{t, ok, bad}]

  function num(el, name) { var v = parseFloat(el.getAttribute(name)); return isFinite(v) ? v : null; }
  function fmt(x) { return x === null ? "…" : (Math.abs(x) < 10 ? x.toFixed(2) : x.toFixed(1)); }

  function sample() {
    var now = Date.now(), ok = 0, bad = 0, seenWorkers = {};
    live.querySelectorAll("tr[data-worker]").forEach(function (row) {
      var id = row.getAttribute("data-worker"), seen = num(row, "data-seen");
      var s = num(row, "data-succeeded") || 0, f = num(row, "data-failed") || 0;
      var prev = beats[id];
      seenWorkers[id] = true;
      if (prev && seen !== null && prev.seen !== null && seen > prev.seen) {
        var dt = seen - prev.seen;
        prev.rate = [Math.max(0, (s - prev.succeeded) / dt), Math.max(0, (f - prev.failed) / dt)];
      }
      if (!prev || seen !== prev.seen) {
        beats[id] = {seen: seen, succeeded: s, failed: f, rate: prev ? prev.rate : null};
      }
      var rate = beats[id].rate, cell = row.querySelector("[data-rate-for]");
      if (cell) { cell.textContent = rate ? fmt(rate[0] + rate[1]) : "…"; }
      if (rate && !row.classList.contains("lost")) { ok += rate[0]; bad += rate[1]; }
    });
    Object.keys(beats).forEach(function (id) { if (!seenWorkers[id]) { delete beats[id]; } });
    live.querySelectorAll("tr[data-queue]").forEach(function (row) {
      var q = row.getAttribute("data-queue"), r = num(row, "data-ready"), d = num(row, "data-dead");
      var prev = queues[q];
      if (prev && now > prev.t) {
        var dt = (now - prev.t) / 1000;
        prev.rate = [(r - prev.ready) / dt, (d - prev.dead) / dt];
      }
      queues[q] = {t: now, ready: r, dead: d, rate: prev ? prev.rate : null};
      var cells = row.querySelectorAll(".qrate");
      var rate = queues[q].rate;
      if (cells.length === 2) {
        cells[0].textContent = rate ? fmt(rate[0]) : "…";
        cells[1].textContent = rate ? fmt(rate[1]) : "…";
      }
    });
    history.push({t: now, ok: ok, bad: bad});
    while (history.length && history[0].t < now - WINDOW_MS) { history.shift(); }
    draw(now);
  }

  function svg(name, attrs) {
    var el = document.createElementNS("http://www.w3.org/2000/svg", name);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    return el;
  }

  function draw(now) {
    if (!chart) { return; }
    while (chart.firstChild) { chart.removeChild(chart.firstChild); }
    var W = 600, H = 160, top = 10, bottom = 20;
    var max = 1;
    history.forEach(function (p) { max = Math.max(max, p.ok, p.bad); });
    var x = function (t) { return W - (now - t) / WINDOW_MS * W; };
    var y = function (v) { return top + (H - top - bottom) * (1 - v / max); };
    chart.appendChild(svg("line", {x1: 0, y1: y(0), x2: W, y2: y(0), "class": "axis"}));
    chart.appendChild(svg("line", {x1: 0, y1: y(max), x2: W, y2: y(max), "class": "grid"}));
    ["ok", "bad"].forEach(function (key) {
      var pts = history.map(function (p) { return x(p.t).toFixed(1) + "," + y(p[key]).toFixed(1); });
      if (pts.length) { chart.appendChild(svg("polyline", {points: pts.join(" "), "class": "line " + key})); }
    });
    chart.setAttribute("data-points", String(history.length));
    var last = history[history.length - 1];
    var now_el = document.getElementById("chart-now");
    if (now_el && last) {
      now_el.textContent = "now: " + fmt(last.ok) + " ok/s, " + fmt(last.bad) + " failed/s; top line: " +
        fmt(max) + "/s; left edge: 5 min ago";
    }
  }

  function reload() {
    fetch(live.getAttribute("data-src"), {credentials: "same-origin", cache: "no-store"})
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        live.innerHTML = html;          // server-rendered, every value escaped there
        live.removeAttribute("data-error");
        sample();
      })
      .catch(function (err) { live.setAttribute("data-error", String(err)); })
      .then(function () { setTimeout(reload, refresh); });
  }

  sample();
  setTimeout(reload, refresh);
})();
