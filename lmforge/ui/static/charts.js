// Metric curves of one or more stages, drawn with uPlot (vendored in static/uplot).
// A panel per metric; every stage is a series (several runs overlaid on one step axis);
// smoothing is TensorBoard's debiased EMA drawn over the faint raw curve; drag to zoom,
// double-click to reset; while a stage is running the data is fetched again every 5 s.
(function () {
  "use strict";
  const COLORS = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#2c7a7b",
                  "#975a16", "#4a5568"];
  const charts = [];
  window.lmforgeCharts = charts;  // what the browser tests read: each panel's uPlot

  function smooth(values, w) {
    if (!(w > 0)) return values.slice();
    let last = 0, n = 0;
    return values.map((v) => {
      if (v == null) return null;
      last = last * w + (1 - w) * v;
      n += 1;
      return last / (1 - Math.pow(w, n));  // debiased: the first point is itself, not w*0
    });
  }

  // one step axis for all stages: the union of their steps, null where a stage has none
  function align(stages, metric, payload) {
    const per = stages.map((s) => (payload.stages[s] && payload.stages[s].metrics[metric]) || [[], []]);
    const xs = [...new Set(per.flatMap(([sx]) => sx))].sort((a, b) => a - b);
    const at = new Map(xs.map((x, i) => [x, i]));
    const ys = per.map(([sx, sy]) => {
      const col = new Array(xs.length).fill(null);
      sx.forEach((x, i) => { col[at.get(x)] = sy[i]; });
      return col;
    });
    return { xs, ys };
  }

  class Panel {
    constructor(box, stages, metric) {
      this.stages = stages;
      this.metric = metric;
      this.el = document.createElement("div");
      this.el.className = "panel";
      this.el.dataset.metric = metric;
      this.el.innerHTML = '<div class="title"></div><div class="plot"></div>';
      this.el.querySelector(".title").textContent = metric;
      box.appendChild(this.el);
      this.plot = null;
      this.w = null;
    }

    draw(payload, w) {
      const { xs, ys } = align(this.stages, this.metric, payload);
      const data = [xs];
      ys.forEach((col) => { data.push(col); if (w > 0) data.push(smooth(col, w)); });
      this.el.dataset.points = String(ys.reduce((n, col) => n + col.filter((v) => v != null).length, 0));
      if (this.plot && this.w === w) {
        const sx = this.plot.scales.x, old = this.plot.data[0];
        const zoomed = old.length && (sx.min > old[0] || sx.max < old[old.length - 1]);
        this.plot.setData(data, !zoomed);  // a zoomed-in view stays put as rows arrive
        return;
      }
      if (this.plot) this.plot.destroy();
      const series = [{ label: "step" }];
      this.stages.forEach((s, i) => {
        const color = COLORS[i % COLORS.length];
        series.push({ label: this.stages.length > 1 ? s : this.metric, stroke: w > 0 ? color + "44" : color,
                      width: w > 0 ? 1 : 1.5, spanGaps: true, points: { show: xs.length < 40 } });
        if (w > 0) series.push({ label: (this.stages.length > 1 ? s : this.metric) + " (smoothed)",
                                  stroke: color, width: 2, spanGaps: true, points: { show: xs.length < 3 } });
      });
      const target = this.el.querySelector(".plot");
      this.plot = new uPlot({
        width: Math.max(320, this.el.clientWidth - 12), height: 260, series,
        scales: { x: { time: false } }, axes: [{ label: "step" }, {}],
        cursor: { drag: { x: true, y: false } }, legend: { live: true },
      }, data, target);
      this.w = w;
    }
  }

  async function fetchCurves(stages, metrics) {
    const q = new URLSearchParams();
    stages.forEach((s) => q.append("s", s));
    metrics.forEach((m) => q.append("m", m));
    const r = await fetch("/api/curves?" + q.toString(), { credentials: "same-origin" });
    if (!r.ok) throw new Error("curves: HTTP " + r.status);
    return r.json();
  }

  function setup(root) {
    const stages = JSON.parse(root.dataset.stages);
    const metrics = JSON.parse(root.dataset.metrics);
    const box = root.querySelector(".panels");
    const slider = root.querySelector(".smoothing");
    const shown = root.querySelector(".smoothing-value");
    const add = root.querySelector(".add-metric");
    const live = root.querySelector(".live");
    const saved = window.localStorage && localStorage.getItem("lmforge.smoothing");
    if (saved !== null && saved !== undefined) slider.value = saved;
    shown.textContent = slider.value;
    const panels = metrics.map((m) => new Panel(box, stages, m));
    panels.forEach((p) => charts.push(p));
    let payload = null, timer = null;

    function drawAll() { panels.forEach((p) => p.draw(payload, Number(slider.value))); }

    async function load() {
      try {
        payload = await fetchCurves(stages, panels.map((p) => p.metric));
      } catch (err) {
        live.textContent = "could not load the curves (" + err.message + "); retrying";
        timer = setTimeout(load, 5000);
        return;
      }
      const have = new Set([...add.options].map((o) => o.value));
      payload.names.forEach((n) => {
        if (!have.has(n)) add.add(new Option(n, n));
      });
      drawAll();
      const running = stages.filter((s) => payload.stages[s] && payload.stages[s].state === "running");
      const problems = stages.flatMap((s) => (payload.stages[s] && payload.stages[s].problems) || []);
      live.textContent = (running.length ? "live: " + running.join(", ") + " running, updating every 5 s" : "")
        + (problems.length ? " · " + problems.join("; ") : "");
      if (running.length) timer = setTimeout(load, 5000);
    }

    slider.addEventListener("input", () => {
      shown.textContent = slider.value;
      if (window.localStorage) localStorage.setItem("lmforge.smoothing", slider.value);
      if (payload) drawAll();
    });
    add.addEventListener("change", () => {
      const m = add.value;
      add.value = "";
      if (!m || panels.some((p) => p.metric === m)) return;
      const p = new Panel(box, stages, m);
      panels.push(p);
      charts.push(p);
      clearTimeout(timer);
      load();
    });
    window.addEventListener("resize", () => panels.forEach((p) => {
      if (p.plot) p.plot.setSize({ width: Math.max(320, p.el.clientWidth - 12), height: 260 });
    }));
    load();
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll(".charts").forEach(setup);
  });
})();
