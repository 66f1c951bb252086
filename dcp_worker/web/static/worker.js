// The worker's page: refresh the live part every second; the buttons POST an action.
"use strict";

const live = () => document.getElementById("live");

function say(text, bad) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.hidden = !text;
  message.classList.toggle("bad", !!bad);
}

async function refresh() {
  try {
    const reply = await fetch("/live", { credentials: "same-origin" });
    if (!reply.ok) {
      const body = await reply.json().catch(() => ({ error: reply.statusText }));
      say(body.error || reply.statusText, true);
      return;
    }
    live().innerHTML = await reply.text();
  } catch (err) {
    say("the worker does not answer (stopped?)", true);
  }
}

async function act(button) {
  const action = button.dataset.action;
  if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
  const body = {};
  if (button.dataset.job) body.job = button.dataset.job;
  if (button.dataset.seconds) body.seconds = Number(button.dataset.seconds);
  const reply = await fetch("/api/" + action, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await reply.json().catch(() => ({ ok: false, error: reply.statusText }));
  say(answer.ok ? action.replace("_", " ") + ": done" : answer.error, !answer.ok);
  await refresh();
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (button) act(button);
});
setInterval(refresh, 1000);
