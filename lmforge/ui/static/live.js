// The runs page: each stage's state refreshed every 5 s (a run that is training turns
// "finished" or "failed" without a reload).
(function () {
  "use strict";
  async function refresh() {
    try {
      const r = await fetch("/api/stages", { credentials: "same-origin" });
      if (!r.ok) return;
      for (const s of await r.json()) {
        const el = document.querySelector(`span[data-stage="${CSS.escape(s.name)}"] .badge`);
        if (el && el.dataset.state !== s.state) {
          el.className = "badge " + s.state;
          el.dataset.state = s.state;
          el.textContent = s.state;
        }
      }
    } catch (err) { /* the server restarting: the next tick tries again */ }
  }
  setInterval(refresh, 5000);
})();
