// Flotilla operator console. Talks to the console server over one WebSocket (see teleop/app.py).
// Driving is hold-to-move: actions go out at SEND_HZ only while an input is held (a key, an on-screen
// button, the gamepad's deadman). When they stop, the fleet server's watchdog holds the robot.
"use strict";

const SEND_HZ = 25;
const CONSOLE_ACTION_DIM = 4; // what the console sends: [dx, dy, dz, gripper], the simulation's Cartesian deltas
const SLOW = 0.3;
const HISTORY = 60; // sparkline points per robot
const $ = (id) => document.getElementById(id);

// Figures the tests and benchmarks/console_latency.py read (nothing secret: the page never sees the token).
const stats = (window.flotillaStats = {
  frames: 0, frameAges: [], lastFrame: null, keyEvents: [], sent: 0, errors: [], notices: [],
  fleet: null, queue: [], assigned: null, fleetLink: "up",
});

let socket = null;
let ended = false; // the console ended this session (signed out, expired, refused by the fleet server)
let fleetUp = true; // the console's link to the fleet server (while down, driving is pointless: not sent)
let me = "";
let assigned = null; // robot id under my control
let assignment = null;
let fleet = null;
let queue = [];
let previous = null; // the robot I had last, so "discard" and "note" work after the hand-back too
let lastFrame = null; // header of the latest frame drawn
let seq = 0;
let grip = -1; // the gripper command kept between inputs (-1 open, +1 closed)
const held = new Set(); // keys held
const padHeld = new Set(); // on-screen buttons held
const history = new Map(); // robot -> recent signals ({uncertainty, risk, density, ...})
const frameTimes = [];

// A long session keeps only the latest of each (a robot refusing every action must not grow the page).
function keep(list, item, most = 5000) { list.push(item); if (list.length > most) list.shift(); }

function now() { return performance.timeOrigin + performance.now(); } // wall clock, ms

// ------------------------------------------------------------------------------------------- socket

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => setLink("connected", true);
  socket.onclose = () => {
    releaseAll();
    if (ended) return;
    setLink("disconnected: reconnecting", false);
    setTimeout(connect, 1000);
  };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") onMessage(JSON.parse(event.data));
    else onFrame(event.data);
  };
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}
window.flotillaSend = send; // for tests: the server, not the page, decides what an operator may do

function setLink(text, ok) {
  const link = $("link");
  link.textContent = text;
  link.className = "pill " + (ok ? "ok" : "bad");
}

function log(text, kind) {
  const line = document.createElement("div");
  line.className = kind;
  line.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  const box = $("messages");
  box.prepend(line);
  while (box.children.length > 30) box.lastChild.remove();
}

function onMessage(m) {
  switch (m.t) {
    case "session":
      if (m.state === "ended") {
        ended = true;
        releaseAll();
        setLink(`signed out: ${m.reason || "session ended"}`, false);
        log(`session ended: ${m.reason || ""}`, "error");
        setTimeout(() => location.reload(), 3000); // back to the sign-in page
        return;
      }
      fleetUp = true;
      me = m.operator;
      $("who").textContent = `operator ${me}`;
      break;
    case "fleet": fleet = stats.fleet = m; renderFleet(); renderMetrics(); if (assigned) renderDrive(); break;
    case "queue": queue = stats.queue = m.entries; renderQueue(); renderFleet(); break;
    case "assignment":
      assigned = stats.assigned = previous = m.robot;
      assignment = m;
      lastFrame = null;
      log(`you have ${m.robot} (${m.reason || "assigned"}${m.needs_reset ? ", reset needed" : ""})`, "notice");
      renderDrive();
      break;
    case "released":
      if (m.robot === assigned) { assigned = stats.assigned = null; assignment = null; releaseAll(); }
      log(`${m.robot} left you (${m.reason || "released"})`, "notice");
      renderDrive();
      break;
    case "link":
      fleetUp = m.fleet === "up";
      stats.fleetLink = m.fleet;
      if (!fleetUp) releaseAll();
      setLink(fleetUp ? "connected" : `fleet server unreachable: ${m.message || "reconnecting"}`, fleetUp);
      log(fleetUp ? "the fleet server is back" : `lost the fleet server: ${m.message || "reconnecting"}`, fleetUp ? "notice" : "error");
      break;
    case "error": keep(stats.errors, m); log(`${m.request} ${m.robot}: ${m.message}`, "error"); break;
    case "notice": keep(stats.notices, m); log(m.message, "notice"); break;
  }
}

// ------------------------------------------------------------------------------------------- camera

async function onFrame(buffer) {
  const view = new DataView(buffer);
  const length = view.getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, length)));
  if (header.robot !== assigned) return;
  const canvas = $("camera");
  if (buffer.byteLength > 4 + length) {
    const type = header.encoding === "png" ? "image/png" : "image/jpeg";
    const bitmap = await createImageBitmap(new Blob([new Uint8Array(buffer, 4 + length)], { type }));
    if (canvas.width !== bitmap.width * 2) { canvas.width = bitmap.width * 2; canvas.height = bitmap.height * 2; }
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
  }
  const age = now() - header.timestamp * 1000; // taken (robot clock) -> drawn
  header.drawnAt = now();
  header.ageMs = age;
  lastFrame = stats.lastFrame = header;
  stats.frames += 1;
  keep(stats.frameAges, age);
  frameTimes.push(header.drawnAt);
  while (frameTimes.length && frameTimes[0] < header.drawnAt - 2000) frameTimes.shift();
  $("frame-age").textContent = age.toFixed(0);
  $("fps").textContent = (frameTimes.length / 2).toFixed(1);
  $("mode").textContent = header.mode;
  // The robot's own state, for robots without a camera too (the end effector, the goal, the gripper).
  const show = (name, values) => (values && values.length ? `${name} [${values.map((v) => v.toFixed(3)).join(", ")}]` : "");
  $("state").textContent = [show("ee", header.obs.ee_pos), show("goal", header.goal), show("gripper", header.obs.gripper)]
    .filter(Boolean).join(" · ");
}

// ------------------------------------------------------------------------------------------ driving

const KEYS = {
  ArrowUp: [0, 1], w: [0, 1], ArrowDown: [0, -1], s: [0, -1],
  ArrowLeft: [1, 1], a: [1, 1], ArrowRight: [1, -1], d: [1, -1],
  r: [2, 1], PageUp: [2, 1], f: [2, -1], PageDown: [2, -1],
};
const GRIP_KEYS = { e: 1, q: -1 };

function keyName(event) { return event.key.length === 1 ? event.key.toLowerCase() : event.key; }

function typing(event) {
  const tag = (event.target && event.target.tagName) || "";
  return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT";
}

function driveKey(key) { return key in KEYS || key in GRIP_KEYS || key === " "; }

document.addEventListener("keydown", (event) => {
  const key = keyName(event);
  if (typing(event) || !driveKey(key) || !assigned) return;
  if (key === " " && event.target && event.target.tagName === "BUTTON") return; // space presses buttons
  event.preventDefault();
  if (key in GRIP_KEYS) grip = GRIP_KEYS[key];
  if (held.has(key)) return; // auto-repeat
  held.add(key);
  const sentSeq = sendAction(); // at once: a key press is not kept waiting for the next send tick
  if (sentSeq) keep(stats.keyEvents, { key, seq: sentSeq, t: event.timeStamp + performance.timeOrigin });
});
document.addEventListener("keyup", (event) => { held.delete(keyName(event)); });
window.addEventListener("blur", releaseAll);
document.addEventListener("visibilitychange", () => { if (document.hidden) releaseAll(); });

function releaseAll() { held.clear(); padHeld.clear(); document.querySelectorAll("#pad .pressed").forEach((b) => b.classList.remove("pressed")); }

function gamepad() {
  const pads = navigator.getGamepads ? navigator.getGamepads() : [];
  for (const pad of pads) if (pad && pad.connected !== false) return pad;
  return null;
}

function deadzone(v) { return Math.abs(v) < 0.15 ? 0 : v; }

// The action from whatever is held now, or null when nothing is (then nothing is sent).
function currentAction() {
  const move = [0, 0, 0];
  let engaged = false;
  const scale = held.has("Shift") ? SLOW : 1;
  for (const key of held) {
    if (key in KEYS) { const [axis, dir] = KEYS[key]; move[axis] += dir * scale; engaged = true; }
    if (key in GRIP_KEYS || key === " ") engaged = true;
  }
  for (const button of padHeld) {
    if (button.dataset.axis !== undefined) move[+button.dataset.axis] += +button.dataset.dir;
    if (button.dataset.grip !== undefined) grip = +button.dataset.grip;
    engaged = true;
  }
  const pad = gamepad();
  if (pad && pad.buttons[0] && pad.buttons[0].pressed) { // A: the deadman
    engaged = true;
    move[0] += -deadzone(pad.axes[1] || 0);
    move[1] += -deadzone(pad.axes[0] || 0);
    move[2] += -deadzone(pad.axes[3] || 0);
    if (pad.buttons[5] && pad.buttons[5].pressed) grip = 1;
    if (pad.buttons[4] && pad.buttons[4].pressed) grip = -1;
  }
  if (!engaged) return null;
  return [...move.map((v) => Math.max(-1, Math.min(1, v))), grip];
}

// The assigned robot's action size when it is not the console's (a ROS arm taking joint positions), else 0.
function undrivable() {
  const entry = fleet && fleet.robots ? fleet.robots.find((r) => r.robot === assigned) : null;
  return entry && entry.action_dim && entry.action_dim !== CONSOLE_ACTION_DIM ? entry.action_dim : 0;
}

function sendAction() {
  if (!assigned || !fleetUp || (assignment && assignment.needs_reset) || undrivable()) return 0;
  const action = currentAction();
  if (!action) return 0;
  seq += 1;
  const frame = lastFrame && lastFrame.robot === assigned ? lastFrame : null;
  send({
    t: "act", robot: assigned, a: action, seq,
    frame_seq: frame ? frame.seq : 0,
    frame_age_ms: frame ? Math.max(0, now() - frame.timestamp * 1000) : 0,
  });
  stats.sent += 1;
  return seq;
}

setInterval(sendAction, 1000 / SEND_HZ);

function setupPad() {
  for (const button of document.querySelectorAll("#pad button")) {
    const press = (event) => {
      event.preventDefault();
      if (!assigned) return;
      padHeld.add(button);
      button.classList.add("pressed");
      sendAction();
    };
    const lift = () => { padHeld.delete(button); button.classList.remove("pressed"); };
    button.addEventListener("pointerdown", press);
    button.addEventListener("pointerup", lift);
    button.addEventListener("pointerleave", lift);
    button.addEventListener("pointercancel", lift);
    // Keyboard users: Enter or Space held on a focused pad button drives like the pointer.
    button.addEventListener("keydown", (event) => { if ((event.key === "Enter" || event.key === " ") && !event.repeat) press(event); });
    button.addEventListener("keyup", (event) => { if (event.key === "Enter" || event.key === " ") lift(); });
  }
}

// ---------------------------------------------------------------------------------------- rendering

function robotState(r) {
  const waiting = queue.find((e) => e.robot === r.robot && !e.assigned_to);
  if (!r.connected) return ["offline", "offline"];
  if (r.estop || (fleet && fleet.fleet_estop)) return ["protective stop", "stopped"];
  if (r.operator) return [r.blocked ? `reset by ${r.operator}` : `teleop: ${r.operator}`, "teleop"];
  if (r.blocked) return ["blocked", "blocked"];
  if (waiting) return ["needs help", "needs-help"];
  if (r.signals.safety_filter === "hold") return ["safety hold", "holding"]; // no sampled plan was safe
  if (r.mode === "hold") return ["holding", "holding"];
  return ["autonomous", "autonomous"];
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content); else td.textContent = content;
  row.append(td);
  return td;
}

const SIGNAL_COLORS = { uncertainty: "#4ea1ff", risk: "#f0b429", density: "#3ecf8e", agree: "#c084fc" };

// One line per signal over the last HISTORY fleet updates, each on its own scale.
function sparkline(series) {
  const canvas = document.createElement("canvas");
  canvas.className = "spark";
  canvas.width = 90; canvas.height = 22;
  const ctx = canvas.getContext("2d");
  for (const [name, color] of Object.entries(SIGNAL_COLORS)) {
    const values = series.map((s) => s[name]);
    const max = Math.max(1e-6, ...values.map(Math.abs));
    ctx.strokeStyle = color;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = (i / Math.max(1, HISTORY - 1)) * 90, y = 21 - (v / max) * 20;
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke();
  }
  return canvas;
}

function renderFleet() {
  if (!fleet) return;
  if (fleet.error) { $("fleet-state").textContent = fleet.error; return; }
  $("fleet-state").textContent = fleet.fleet_estop ? "WHOLE FLEET PROTECTIVE STOP" : `${fleet.robots.length} robots, operators: ${fleet.operators.join(", ")}`;
  const body = document.querySelector("#fleet tbody");
  body.replaceChildren();
  for (const r of [...fleet.robots].sort((a, b) => a.robot.localeCompare(b.robot))) {
    const values = history.get(r.robot) || [];
    if (!values.stamp || values.stamp !== fleet.time) {
      values.push(r.signals);
      values.stamp = fleet.time;
      while (values.length > HISTORY) values.shift();
      history.set(r.robot, values);
    }
    const row = document.createElement("tr");
    row.dataset.robot = r.robot;
    if (r.robot === assigned) row.className = "mine";
    const [text, kind] = robotState(r);
    const state = document.createElement("span");
    state.className = `state ${kind}`;
    state.textContent = text;
    cell(row, r.robot);
    cell(row, state).className = "state-cell";
    cell(row, `${r.task} ${r.goal.length ? "[" + r.goal.map((v) => v.toFixed(2)).join(", ") + "]" : ""}`);
    cell(row, r.policy || "-");
    const sig = cell(row, sparkline(values));
    sig.title = `uncertainty ${r.signals.uncertainty} (blue), risk ${r.signals.risk} (orange), density ${r.signals.density} (green), agree ${r.signals.agree} (purple)` +
      (r.signals.safety_filter ? `; safety filter: ${r.signals.safety_filter}` : "");
    // A protective stop of one robot, and its release (the fleet server says who may release it).
    const stop = document.createElement("button");
    stop.className = r.estop ? "quiet release-stop" : "stop robot-stop";
    stop.textContent = r.estop ? "Release stop" : "Stop";
    stop.setAttribute("aria-label", `${r.estop ? "release the protective stop of" : "protective stop"} ${r.robot}`);
    stop.addEventListener("click", () => send({ t: "estop", robot: r.robot, engage: !r.estop }));
    cell(row, stop);
    body.append(row);
  }
  $("fleet-stop").disabled = !!fleet.fleet_estop;
}

function renderQueue() {
  const body = document.querySelector("#queue tbody");
  body.replaceChildren();
  const busy = !!assigned;
  queue.forEach((e, i) => {
    const row = document.createElement("tr");
    row.dataset.robot = e.robot;
    cell(row, String(i + 1));
    cell(row, e.robot);
    cell(row, e.reason.replace("_", " "));
    cell(row, e.score.toFixed(2));
    cell(row, `${e.waited_s.toFixed(1)} s`);
    cell(row, e.assigned_to || "waiting");
    const pick = document.createElement("button");
    pick.textContent = "Take";
    pick.disabled = busy || !!e.assigned_to;
    pick.addEventListener("click", () => send({ t: "pick", robot: e.robot }));
    cell(row, pick);
    body.append(row);
  });
}

function renderDrive() {
  $("robot-name").textContent = assigned || "none assigned";
  const other = undrivable();
  $("assignment").textContent = (assignment ? `${assignment.reason}${assignment.needs_reset ? ", resetting" : ""}, at least ${assignment.min_steps} steps` : "") +
    (other ? ` · it takes ${other}-D actions; this console drives ${CONSOLE_ACTION_DIM}-D [dx, dy, dz, gripper] robots only: hand it back or stop it` : "");
  for (const id of ["release", "reset", "robot-stop", "robot-release"]) $(id).disabled = !assigned;
  renderQueue();
}

function renderMetrics() {
  if (!fleet || !fleet.rounds) return;
  const robots = Math.max(1, fleet.robots.length), operators = Math.max(1, fleet.operators.length);
  const rows = fleet.rounds.map((r) => ({
    policy: r.policy || "(none)",
    episodes: r.episodes,
    auto: r.episodes ? r.autonomous_successes / r.episodes : 0,
    rohe: (operators / robots) * r.autonomous_successes / (1 + r.human_steps),
    human: r.human_s,
  }));
  const body = document.querySelector("#rounds tbody");
  body.replaceChildren();
  for (const r of rows) {
    const row = document.createElement("tr");
    cell(row, r.policy); cell(row, String(r.episodes)); cell(row, `${(100 * r.auto).toFixed(0)}%`);
    cell(row, r.rohe.toFixed(3)); cell(row, `${r.human.toFixed(0)} s`);
    body.append(row);
  }
  drawChart(rows);
  const tallies = document.querySelector("#tallies tbody");
  tallies.replaceChildren();
  for (const t of fleet.tallies) {
    const row = document.createElement("tr");
    if (t.operator === me) row.className = "mine";
    cell(row, t.operator); cell(row, String(t.interventions)); cell(row, `${t.control_s.toFixed(0)} s`); cell(row, String(t.discarded));
    tallies.append(row);
  }
}

function drawChart(rows) {
  const canvas = $("rounds-chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  if (!rows.length) return;
  const slot = w / rows.length, maxHuman = Math.max(1, ...rows.map((r) => r.human));
  ctx.font = "10px system-ui";
  rows.forEach((r, i) => {
    const barH = r.auto * (h - 24);
    ctx.fillStyle = "#3ecf8e";
    ctx.fillRect(i * slot + slot * 0.2, h - 12 - barH, slot * 0.3, barH);
    const humanH = (r.human / maxHuman) * (h - 24);
    ctx.fillStyle = "#f0b429";
    ctx.fillRect(i * slot + slot * 0.5, h - 12 - humanH, slot * 0.3, humanH);
    ctx.fillStyle = "#9aa7b4";
    ctx.fillText(r.policy.slice(0, 10), i * slot + 2, h - 2);
  });
  ctx.fillStyle = "#3ecf8e"; ctx.fillText("autonomous success", 4, 10);
  ctx.fillStyle = "#f0b429"; ctx.fillText("human time", 110, 10);
}

// ------------------------------------------------------------------------------------------ buttons

function setup() {
  setupPad();
  $("release").addEventListener("click", () => assigned && send({ t: "release", robot: assigned }));
  $("reset").addEventListener("click", () => assigned && send({ t: "reset", robot: assigned }));
  $("robot-stop").addEventListener("click", () => assigned && send({ t: "estop", robot: assigned, engage: true }));
  $("robot-release").addEventListener("click", () => assigned && send({ t: "estop", robot: assigned, engage: false }));
  $("fleet-stop").addEventListener("click", () => send({ t: "estop", robot: "", engage: true }));
  $("fleet-release").addEventListener("click", () => send({ t: "estop", robot: "", engage: false }));
  $("discard").addEventListener("click", () => {
    const robot = assigned || lastRobot();
    if (robot) send({ t: "discard", robot });
  });
  $("note-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const robot = assigned || lastRobot();
    const text = $("note").value.trim();
    if (robot && text) { send({ t: "note", robot, text }); $("note").value = ""; }
  });
  renderDrive();
  connect();
}

function lastRobot() { return previous; }

setup();
