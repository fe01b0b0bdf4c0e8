// The tmem broker's dashboard (docs/dashboard.md). Plain browser JavaScript, no libraries.
//
// The admin token lives in this closure only: typed into the form, or read once from the URL
// fragment (#token=...), which the page then removes from the address bar. It goes to the
// broker as the first message of the /dashboard/live WebSocket and as a bearer header on the
// pools request, never in a URL. Until the broker accepts it the page shows only the form.
//
// Testable markup: every figure carries data-stat (its /v1/stats field, dotted for nested
// ones) and data-value (the exact value); guest rows carry data-guest-id and their cells
// data-stat relative to that guest's entry in /v1/stats "guests"; figures that are not
// /v1/stats fields (rates, hit rates, pressure reports, pools) carry data-field instead.
"use strict";

(() => {
  const CLOSE_UNAUTHORISED = 4401;
  const CLOSE_FORBIDDEN = 4403;
  const STALE_MS = 3000;
  const SVG = "http://www.w3.org/2000/svg";

  let token = null;
  let socket = null;
  let signedIn = false;
  let retryMs = 1000;
  let retryTimer = null;
  let lastMessageAt = 0;
  let last = null; // the latest snapshot
  let points = []; // chart points [t, capacity, used, charged, gets, get_hits]
  let sortKey = "name";
  let sortDir = 1;
  let openGuest = null; // guest id whose pools are shown
  let poolsInFlight = false;

  const $ = (id) => document.getElementById(id);

  // -- formatting ---------------------------------------------------------------------------

  function fmtBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = Number(n);
    let u = 0;
    while (Math.abs(v) >= 1024 && u < units.length - 1) {
      v /= 1024;
      u += 1;
    }
    return (u === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[u];
  }

  function fmtInt(n) {
    return Number(n).toLocaleString("en-US");
  }

  function fmtRatio(n) {
    return Number(n).toFixed(2) + "×";
  }

  function fmtRate(n) {
    if (n === null || !isFinite(n)) return "–";
    return n >= 100 ? fmtInt(Math.round(n)) : n.toFixed(1);
  }

  function fmtPct(n) {
    return n === null || !isFinite(n) ? "–" : (100 * n).toFixed(1) + " %";
  }

  function format(value, how) {
    if (value === null || value === undefined) return "–";
    switch (how) {
      case "bytes":
        return fmtBytes(value);
      case "int":
        return fmtInt(value);
      case "ratio":
        return fmtRatio(value);
      case "pct":
        return fmtPct(value);
      default:
        return String(value);
    }
  }

  function exact(value) {
    if (value === null || value === undefined) return "";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  function lookup(obj, path) {
    let v = obj;
    for (const part of path.split(".")) {
      if (v === null || v === undefined) return undefined;
      v = v[part];
    }
    return v;
  }

  // A figure: the rounded text for people, the exact value in data-value.
  function show(el, value, how) {
    el.dataset.value = exact(value);
    el.textContent = format(value, how);
  }

  function cell(tr, text, attrs) {
    const td = document.createElement("td");
    td.textContent = text;
    for (const [k, v] of Object.entries(attrs || {})) td.setAttribute(k, v);
    tr.appendChild(td);
    return td;
  }

  function ago(iso) {
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }

  // -- sign-in and the live socket ----------------------------------------------------------

  function setStatus(state, text) {
    const el = $("status");
    el.dataset.state = state;
    el.textContent = text;
  }

  function clearBoard() {
    $("board").hidden = true;
    for (const el of document.querySelectorAll("#board [data-stat], #board [data-rate]")) {
      el.textContent = "";
      delete el.dataset.value;
    }
    for (const id of ["guests", "pools-table", "shared-table", "brokers-table"]) {
      $(id).querySelector("tbody").replaceChildren();
    }
    $("notices").replaceChildren();
    $("host-figures").replaceChildren();
    $("pools").hidden = true;
    openGuest = null;
    last = null;
    points = [];
  }

  function signOut(message) {
    token = null;
    signedIn = false;
    if (retryTimer !== null) clearTimeout(retryTimer);
    retryTimer = null;
    if (socket !== null) {
      const s = socket;
      socket = null;
      s.onclose = null;
      s.close();
    }
    clearBoard();
    $("signin").hidden = false;
    $("signout").hidden = true;
    $("signin-error").textContent = message || "";
    $("updated").textContent = "";
    setStatus("signed-out", "signed out");
    $("token").focus();
  }

  function connect() {
    if (token === null) return;
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/dashboard/live";
    const s = new WebSocket(url);
    socket = s;
    setStatus("connecting", signedIn ? "reconnecting…" : "connecting…");
    s.onopen = () => s.send(JSON.stringify({ token: token }));
    s.onmessage = (event) => {
      if (socket !== s) return;
      let snap;
      try {
        snap = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      if (!signedIn) {
        signedIn = true;
        $("signin").hidden = true;
        $("signout").hidden = false;
        $("signin-error").textContent = "";
        $("board").hidden = false;
      }
      retryMs = 1000;
      lastMessageAt = Date.now();
      setStatus("live", snap.ready ? "live" : "live · broker not ready");
      receive(snap);
    };
    s.onclose = (event) => {
      if (socket !== s) return;
      socket = null;
      if (event.code === CLOSE_UNAUTHORISED || event.code === CLOSE_FORBIDDEN) {
        signOut(event.code === CLOSE_FORBIDDEN
          ? "That is a guest's token; the dashboard needs the admin token."
          : "The broker does not know that token.");
        return;
      }
      // The broker restarted or the network dropped: keep what is shown, try again.
      setStatus("down", "disconnected · retrying in " + Math.round(retryMs / 1000) + " s");
      if (!signedIn) $("signin-error").textContent = "Cannot reach the broker; retrying.";
      retryTimer = setTimeout(() => {
        retryTimer = null;
        connect();
      }, retryMs);
      retryMs = Math.min(retryMs * 2, 10000);
    };
  }

  function signIn(value) {
    const t = (value || "").trim();
    if (!t) return;
    if (socket !== null || signedIn) signOut("");
    token = t;
    $("signin-error").textContent = "";
    connect();
  }

  // -- rendering ----------------------------------------------------------------------------

  function receive(snap) {
    if (snap.history) points = snap.history.slice();
    else if (snap.point && (points.length === 0 || points[points.length - 1][0] < snap.point[0])) {
      points.push(snap.point);
      if (points.length > 900) points.shift();
    }
    last = snap;
    renderFigures(snap.stats);
    renderRates();
    renderGuests(snap);
    renderShared(snap.stats.shared_pools || [], snap.stats.guests || []);
    renderBrokers(snap.stats.brokers);
    renderHost(snap.stats);
    renderNotices(snap);
    drawCharts(snap.stats);
    if (openGuest !== null) loadPools(openGuest);
    $("updated").textContent = "updated " + new Date(snap.t * 1000).toLocaleTimeString();
  }

  function renderFigures(stats) {
    for (const el of document.querySelectorAll("#board .cards [data-stat]")) {
      show(el, lookup(stats, el.dataset.stat), el.dataset.format);
    }
    const state = stats.pressure ? stats.pressure.state : null;
    for (const el of document.querySelectorAll('[data-stat="pressure.state"]')) el.dataset.level = state || "";
    const cap = stats.capacity_bytes || 1;
    $("fill").style.width = Math.min(100, (100 * stats.charged_bytes) / cap) + "%";
    const p = stats.pressure || {};
    for (const [id, key] of [["mark-low", "low_watermark_bytes"], ["mark-high", "high_watermark_bytes"]]) {
      const mark = $(id);
      mark.hidden = p[key] === undefined;
      if (p[key] !== undefined) mark.style.left = Math.min(100, (100 * p[key]) / cap) + "%";
    }
  }

  // Hits and misses per second over the last few points (smoother than point to point).
  function rates() {
    const n = points.length;
    if (n < 2) return { hits: null, misses: null };
    const a = points[Math.max(0, n - 4)];
    const b = points[n - 1];
    const dt = b[0] - a[0];
    if (dt <= 0) return { hits: null, misses: null };
    const hits = (b[5] - a[5]) / dt;
    const misses = (b[4] - b[5] - (a[4] - a[5])) / dt;
    return { hits: Math.max(0, hits), misses: Math.max(0, misses) };
  }

  function renderRates() {
    const r = rates();
    for (const [key, value] of [["get_hits", r.hits], ["get_misses", r.misses]]) {
      const el = document.querySelector('[data-rate="' + key + '"]');
      el.dataset.field = key + "_per_second";
      el.dataset.value = exact(value);
      el.textContent = fmtRate(value);
    }
  }

  function guestRows(snap) {
    return (snap.stats.guests || []).map((g) => {
      const extra = (snap.guests || {})[String(g.guest_id)] || {};
      const declined = g.puts_declined || {};
      const declines = Object.values(declined).reduce((a, b) => a + b, 0);
      return {
        g: g,
        extra: extra,
        name: g.name,
        dedup_domain: g.dedup_domain,
        weight: g.weight,
        persistent_pages: g.persistent_pages,
        ephemeral_pages: g.ephemeral_pages,
        quota_pages: g.quota_pages === null ? Infinity : g.quota_pages,
        hit_rate: g.gets ? g.get_hits / g.gets : -1,
        declines: declines,
        shed: extra.shed ? extra.shed.pages : -1,
        pressure: extra.pressure ? extra.pressure.psi_some_avg10 || 0 : -1,
      };
    });
  }

  function renderGuests(snap) {
    const rows = guestRows(snap);
    rows.sort((a, b) => {
      const x = a[sortKey];
      const y = b[sortKey];
      if (x === y) return a.g.guest_id - b.g.guest_id;
      return (x < y ? -1 : 1) * sortDir;
    });
    const body = document.createElement("tbody");
    for (const row of rows) {
      const g = row.g;
      const tr = document.createElement("tr");
      tr.dataset.guestId = String(g.guest_id);
      tr.tabIndex = 0;
      if (g.guest_id === openGuest) tr.classList.add("open");
      if (g.frozen) tr.classList.add("frozen");
      const name = cell(tr, g.name + (g.frozen ? " (frozen)" : ""), { "data-stat": "name", "data-value": g.name });
      name.classList.add("name");
      cell(tr, g.dedup_domain, { "data-stat": "dedup_domain", "data-value": g.dedup_domain });
      for (const key of ["weight", "persistent_pages", "ephemeral_pages"]) {
        cell(tr, fmtInt(g[key]), { "data-stat": key, "data-value": exact(g[key]), class: "num" });
      }
      const quota = g.quota_pages === null ? "none" : fmtInt(g.quota_pages);
      const q = cell(tr, quota, { "data-stat": "quota_pages", "data-value": exact(g.quota_pages), class: "num" });
      if (g.cap_pages !== null && g.quota_pages !== g.cap_pages) q.title = "cap " + fmtInt(g.cap_pages);
      cell(tr, g.gets ? fmtPct(row.hit_rate) : "–", {
        "data-field": "hit_rate",
        "data-value": g.gets ? exact(row.hit_rate) : "",
        class: "num",
        title: fmtInt(g.get_hits) + " hits of " + fmtInt(g.gets) + " gets",
      });
      const reasons = Object.entries(g.puts_declined || {})
        .filter(([, n]) => n > 0)
        .map(([k, n]) => k + " " + fmtInt(n));
      cell(tr, fmtInt(row.declines), {
        "data-stat": "puts_declined",
        "data-value": exact(g.puts_declined),
        class: "num" + (row.declines ? " warn" : ""),
        title: reasons.join(", ") || "none",
      });
      const shed = row.extra.shed;
      const shedText = shed
        ? fmtInt(shed.pages) + " pages, " + (shed.overdue ? "overdue" : shed.acked ? "acked" : "due in " + Math.max(0, Math.round(shed.due_in_s)) + " s")
        : "–";
      const sc = cell(tr, shedText, { "data-field": "shed", "data-value": exact(shed || null) });
      if (shed && shed.overdue) sc.classList.add("bad");
      else if (shed) sc.classList.add("warn");
      const pr = row.extra.pressure;
      const prText = pr
        ? "PSI " + (pr.psi_some_avg10 === null || pr.psi_some_avg10 === undefined ? "–" : Number(pr.psi_some_avg10).toFixed(1)) + " · " + ago(pr.received_at)
        : "–";
      cell(tr, prText, { "data-field": "pressure", "data-value": exact(pr || null) });
      body.appendChild(tr);
    }
    $("guests").querySelector("tbody").replaceWith(body);
    for (const th of document.querySelectorAll("#guests th[data-sort]")) {
      th.classList.toggle("sorted", th.dataset.sort === sortKey);
      th.dataset.dir = th.dataset.sort === sortKey ? (sortDir > 0 ? "asc" : "desc") : "";
    }
  }

  function poolRow(p) {
    const tr = document.createElement("tr");
    tr.dataset.poolId = String(p.pool_id);
    cell(tr, String(p.pool_id), { "data-field": "pool_id", "data-value": String(p.pool_id) });
    const kind = p.kind + (p.shared ? " (shared)" : "");
    cell(tr, kind, { "data-field": "kind", "data-value": p.kind });
    for (const key of ["logical_pages", "zero_pages"]) {
      cell(tr, fmtInt(p[key]), { "data-field": key, "data-value": exact(p[key]), class: "num" });
    }
    cell(tr, fmtBytes(p.charged_bytes), { "data-field": "charged_bytes", "data-value": exact(p.charged_bytes), class: "num" });
    for (const key of ["puts", "gets", "get_hits", "flushes", "evictions", "dedup_hits"]) {
      cell(tr, fmtInt(p[key]), { "data-field": key, "data-value": exact(p[key]), class: "num" });
    }
    return tr;
  }

  async function loadPools(guestId) {
    if (poolsInFlight || token === null) return;
    poolsInFlight = true;
    try {
      const r = await fetch("/v1/guests/" + guestId + "/pools", {
        headers: { Authorization: "Bearer " + token },
        cache: "no-store",
      });
      if (openGuest !== guestId) return;
      const body = document.createElement("tbody");
      if (r.ok) {
        const pools = await r.json();
        for (const p of pools) body.appendChild(poolRow(p));
        if (pools.length === 0) {
          const tr = document.createElement("tr");
          cell(tr, "no pools", { colspan: "11", class: "muted" });
          body.appendChild(tr);
        }
      } else {
        const tr = document.createElement("tr");
        cell(tr, r.status === 404 ? "this guest is gone" : "could not load the pools (" + r.status + ")", { colspan: "11", class: "error" });
        body.appendChild(tr);
      }
      $("pools-table").querySelector("tbody").replaceWith(body);
    } catch (err) {
      // the broker is unreachable; the socket's reconnect shows it
    } finally {
      poolsInFlight = false;
    }
  }

  function openPools(guestId) {
    openGuest = guestId;
    const g = last && (last.stats.guests || []).find((x) => x.guest_id === guestId);
    $("pools-guest").textContent = g ? g.name + " (guest " + guestId + ")" : "guest " + guestId;
    $("pools-guest").dataset.guestId = String(guestId);
    $("pools-table").querySelector("tbody").replaceChildren();
    $("pools").hidden = false;
    for (const tr of document.querySelectorAll("#guests tbody tr")) {
      tr.classList.toggle("open", tr.dataset.guestId === String(guestId));
    }
    loadPools(guestId);
  }

  function renderShared(shared, guests) {
    const names = new Map(guests.map((g) => [g.guest_id, g.name]));
    $("shared").hidden = shared.length === 0;
    const body = document.createElement("tbody");
    shared.forEach((p, i) => {
      const tr = document.createElement("tr");
      const base = "shared_pools." + i + ".";
      cell(tr, p.uuid, { "data-stat": base + "uuid", "data-value": p.uuid });
      const members = p.members.map((id) => names.get(id) || "guest " + id);
      cell(tr, members.join(", "), { "data-stat": base + "members", "data-value": exact(p.members) });
      for (const key of ["logical_pages", "zero_pages"]) {
        cell(tr, fmtInt(p[key]), { "data-stat": base + key, "data-value": exact(p[key]), class: "num" });
      }
      cell(tr, fmtBytes(p.charged_bytes), { "data-stat": base + "charged_bytes", "data-value": exact(p.charged_bytes), class: "num" });
      cell(tr, fmtInt(p.evictions), { "data-stat": base + "evictions", "data-value": exact(p.evictions), class: "num" });
      body.appendChild(tr);
    });
    $("shared-table").querySelector("tbody").replaceWith(body);
  }

  // Cluster mode: one row per broker, whatever figures each has (absent on a single broker).
  function renderBrokers(brokers) {
    const list = Array.isArray(brokers) ? brokers : [];
    $("brokers").hidden = list.length === 0;
    if (list.length === 0) return;
    const keys = [...new Set(list.flatMap((b) => Object.keys(b).filter((k) => typeof b[k] !== "object")))];
    const head = document.createElement("tr");
    for (const k of keys) {
      const th = document.createElement("th");
      th.textContent = k.replace(/_/g, " ");
      head.appendChild(th);
    }
    $("brokers-table").querySelector("thead").replaceChildren(head);
    const body = document.createElement("tbody");
    list.forEach((b, i) => {
      const tr = document.createElement("tr");
      tr.dataset.brokerId = exact(b.broker_id !== undefined ? b.broker_id : i);
      for (const k of keys) {
        const how = k.endsWith("_bytes") ? "bytes" : typeof b[k] === "number" ? "int" : "text";
        cell(tr, format(b[k], how), { "data-stat": "brokers." + i + "." + k, "data-value": exact(b[k]) });
      }
      body.appendChild(tr);
    });
    $("brokers-table").querySelector("tbody").replaceWith(body);
  }

  // The host's memory figures, where the broker reads them ("host" in /v1/stats or in its
  // "pressure" entry); the card stays hidden otherwise.
  function renderHost(stats) {
    let base = null;
    if (stats.host && typeof stats.host === "object") base = "host";
    else if (stats.pressure && stats.pressure.host && typeof stats.pressure.host === "object") base = "pressure.host";
    $("host").hidden = base === null;
    if (base === null) return;
    const dl = document.createElement("dl");
    dl.id = "host-figures";
    for (const [k, v] of Object.entries(lookup(stats, base))) {
      if (v !== null && typeof v === "object") continue;
      const dt = document.createElement("dt");
      dt.textContent = k.replace(/_/g, " ");
      const dd = document.createElement("dd");
      dd.dataset.stat = base + "." + k;
      show(dd, v, k.endsWith("_bytes") ? "bytes" : typeof v === "number" ? "int" : "text");
      dl.append(dt, dd);
    }
    $("host-figures").replaceWith(dl);
  }

  function renderNotices(snap) {
    const names = new Map((snap.stats.guests || []).map((g) => [g.guest_id, g.name]));
    const list = document.createElement("ol");
    list.id = "notices";
    list.reversed = true;
    const notices = (snap.notices || []).slice().reverse();
    for (const n of notices) {
      const li = document.createElement("li");
      li.dataset.field = "notice";
      li.dataset.value = exact(n);
      li.classList.add("notice", "n-" + n.type);
      const when = document.createElement("time");
      when.dateTime = n.issued_at;
      when.textContent = new Date(n.issued_at).toLocaleTimeString();
      const type = document.createElement("b");
      type.textContent = n.type;
      const text = document.createElement("span");
      let what = (names.get(n.guest_id) || "guest " + n.guest_id) + " #" + n.seq;
      if (n.type === "shed") what += ": return " + fmtInt(n.pages) + " pages by " + new Date(n.deadline).toLocaleTimeString();
      else if (n.type === "quota") what += ": quota " + (n.cap_pages === null ? "none" : fmtInt(n.cap_pages) + " pages");
      else if (n.type === "evicted") what += ": " + fmtInt(n.pages) + " pages evicted";
      text.textContent = what;
      li.append(when, type, text);
      list.appendChild(li);
    }
    if (notices.length === 0) {
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = "no notices since the broker started";
      list.appendChild(li);
    }
    $("notices").replaceWith(list);
  }

  // -- charts (hand-drawn SVG) --------------------------------------------------------------

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // Draws series over time: each {values, cls, area}; hlines: {value, cls}.
  function chart(svg, times, series, hlines, yMax, yFormat) {
    const w = Math.max(200, svg.clientWidth || svg.getBoundingClientRect().width);
    const h = Math.max(120, svg.clientHeight || svg.getBoundingClientRect().height);
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.replaceChildren();
    const left = 64;
    const right = 8;
    const top = 8;
    const bottom = 22;
    const pw = w - left - right;
    const ph = h - top - bottom;
    const t1 = times.length ? times[times.length - 1] : Date.now() / 1000;
    const t0 = Math.min(times.length ? times[0] : t1, t1 - 60);
    const x = (t) => left + (pw * (t - t0)) / Math.max(1, t1 - t0);
    const y = (v) => top + ph - (ph * Math.min(v, yMax)) / yMax;
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      el("line", { x1: left, x2: w - right, y1: y(v), y2: y(v), class: "grid" }, svg);
      const label = el("text", { x: left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, svg);
      label.textContent = yFormat(v);
    }
    const span = t1 - t0;
    const step = span > 600 ? 300 : span > 240 ? 120 : span > 120 ? 60 : 30;
    for (let t = t1; t >= t0; t -= step) {
      const ago = Math.round(t1 - t);
      const label = el("text", { x: x(t), y: h - 6, class: "axis", "text-anchor": ago === 0 ? "end" : "middle" }, svg);
      label.textContent = ago === 0 ? "now" : "-" + (ago >= 60 ? Math.round(ago / 60) + " min" : ago + " s");
    }
    for (const line of hlines) {
      if (line.value === undefined || line.value === null) continue;
      el("line", { x1: left, x2: w - right, y1: y(line.value), y2: y(line.value), class: line.cls }, svg);
    }
    for (const s of series) {
      if (times.length === 0) continue;
      const pts = times.map((t, i) => x(t).toFixed(1) + "," + y(s.values[i]).toFixed(1));
      if (s.area) {
        const base = y(0).toFixed(1);
        el("polygon", { points: x(times[0]).toFixed(1) + "," + base + " " + pts.join(" ") + " " + x(t1).toFixed(1) + "," + base, class: s.cls + " area" }, svg);
      }
      el("polyline", { points: pts.join(" "), class: s.cls }, svg);
    }
  }

  function drawCharts(stats) {
    const times = points.map((p) => p[0]);
    const p = stats.pressure || {};
    const capMax = Math.max(...points.map((q) => q[1]), stats.capacity_bytes || 1);
    chart(
      $("chart-storage"),
      times,
      [
        { values: points.map((q) => q[1]), cls: "s-cap" },
        { values: points.map((q) => q[2]), cls: "s-used", area: true },
        { values: points.map((q) => q[3]), cls: "s-charged" },
      ],
      [
        { value: p.high_watermark_bytes, cls: "wm high" },
        { value: p.low_watermark_bytes, cls: "wm low" },
      ],
      capMax * 1.05,
      fmtBytes,
    );
    const rt = [];
    const hits = [];
    const misses = [];
    for (let i = 1; i < points.length; i++) {
      const a = points[i - 1];
      const b = points[i];
      const dt = b[0] - a[0];
      if (dt <= 0) continue;
      rt.push(b[0]);
      hits.push(Math.max(0, (b[5] - a[5]) / dt));
      misses.push(Math.max(0, (b[4] - b[5] - (a[4] - a[5])) / dt));
    }
    chart(
      $("chart-gets"),
      rt,
      [
        { values: hits, cls: "s-hits", area: true },
        { values: misses, cls: "s-misses" },
      ],
      [],
      niceMax(Math.max(1, ...hits, ...misses)),
      (v) => fmtRate(v),
    );
  }

  // -- wiring -------------------------------------------------------------------------------

  function init() {
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("token");
      const value = input.value;
      input.value = "";
      signIn(value);
    });
    $("signout").addEventListener("click", () => signOut(""));
    for (const th of document.querySelectorAll("#guests th[data-sort]")) {
      th.addEventListener("click", () => {
        if (sortKey === th.dataset.sort) sortDir = -sortDir;
        else {
          sortKey = th.dataset.sort;
          sortDir = 1;
        }
        if (last) renderGuests(last);
      });
    }
    const pick = (event) => {
      const tr = event.target.closest("tr[data-guest-id]");
      if (tr) openPools(Number(tr.dataset.guestId));
    };
    $("guests").addEventListener("click", pick);
    $("guests").addEventListener("keydown", (event) => {
      if (event.key === "Enter") pick(event);
    });
    $("pools-close").addEventListener("click", () => {
      openGuest = null;
      $("pools").hidden = true;
      for (const tr of document.querySelectorAll("#guests tbody tr.open")) tr.classList.remove("open");
    });
    setInterval(() => {
      if (signedIn && socket !== null && Date.now() - lastMessageAt > STALE_MS) {
        setStatus("stale", "no update for " + Math.round((Date.now() - lastMessageAt) / 1000) + " s");
      }
    }, 1000);
    window.addEventListener("resize", () => {
      if (last) drawCharts(last.stats);
    });
    // A token in the fragment (on load, or pasted into the address bar later) is read once
    // and removed from the address bar and the history.
    window.addEventListener("hashchange", tokenFromFragment);
    if (!tokenFromFragment()) $("token").focus();
  }

  function tokenFromFragment() {
    const match = /^#token=(.+)$/.exec(location.hash);
    if (!match) return false;
    window.history.replaceState(null, "", location.pathname + location.search);
    signIn(decodeURIComponent(match[1]));
    return true;
  }

  init();
})();
