// The job page refreshes its numbers every two seconds while the job is active, from
// /console/jobs/JOB/counts.json (the same check of the same cookie as the page). No build step.
"use strict";
(function () {
  const job = document.getElementById("job");
  if (!job || job.dataset.state !== "active") return;
  const url = "/console/jobs/" + encodeURIComponent(job.dataset.job) + "/counts.json";
  async function refresh() {
    let reply;
    try {
      reply = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    } catch (e) {
      return setTimeout(refresh, 5000);
    }
    if (!reply.ok) return;
    const doc = await reply.json();
    for (const [state, n] of Object.entries(doc.counts)) {
      const cell = job.querySelector('[data-count="' + state + '"]');
      if (cell) cell.textContent = String(n);
    }
    const bar = job.querySelector("progress");
    if (bar) bar.value = doc.done;
    document.getElementById("done-percent").textContent = Math.round(doc.done * 100) + "%";
    document.getElementById("job-state").textContent = doc.state;
    job.dataset.state = doc.state;
    if (doc.state === "active") setTimeout(refresh, 2000);
  }
  setTimeout(refresh, 2000);
})();
