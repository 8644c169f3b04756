// The pxepeer dashboard: polls /v1/dashboard (peer/api/dashboard.py says why polling)
// and renders it. Every value in the document may come from a hostile peer or report:
// it reaches the page through textContent, element properties and setAttribute only,
// never as markup (the Content-Security-Policy's Trusted Types make every HTML sink throw).
"use strict";

(() => {
  const DOCUMENT = "/v1/dashboard";
  const POLL_MS = 2000;
  const MAX_BACKOFF_MS = 15000;
  const TIMEOUT_MS = 10000;

  let failures = 0;
  let timer = null;
  let inFlight = false;
  let lastEtag = null;

  // -- building blocks (no markup anywhere) ----------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function cell(row, content, className) {
    const td = el("td", className);
    if (content instanceof Node) td.append(content);
    else if (content !== undefined && content !== null) td.textContent = String(content);
    row.append(td);
    return td;
  }

  function str(value, fallback = "–") {
    return typeof value === "string" && value !== "" ? value : fallback;
  }

  function num(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : 0;
  }

  function bytes(n) {
    n = num(n);
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
  }

  function pct(value) {
    return Math.round(num(value) * 10) / 10 + "%";
  }

  function clock(seconds) {
    if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds <= 0) return "–";
    return new Date(seconds * 1000).toLocaleTimeString();
  }

  function bar(percent, label) {
    const wrap = el("span", "bar");
    const progress = document.createElement("progress");
    progress.max = 100;
    progress.value = Math.min(100, Math.max(0, num(percent)));
    if (label) progress.setAttribute("aria-label", label);
    wrap.append(progress, el("span", "pct", percent === null ? "–" : pct(percent)));
    return wrap;
  }

  function fill(section, rows) {
    const tbody = section.querySelector("tbody");
    tbody.replaceChildren(...rows);
    const empty = section.querySelector(".empty");
    if (empty) empty.hidden = rows.length > 0;
  }

  function $(id) {
    return document.getElementById(id);
  }

  // -- sections ---------------------------------------------------------------------------

  function renderOverview(doc) {
    $("site-name").textContent = "site " + str(doc.site);
    const self = (doc.peers || []).find((p) => p && p.self) || {};
    $("this-peer").textContent = str(doc.node_id) + (doc.address ? " (" + doc.address + ")" : "");
    const responders = (doc.responders || []).filter((r) => typeof r === "string");
    $("responder").textContent = responders.length
      ? responders.join(", ") + (doc.this_peer_responds ? " (this peer)" : "")
      : "none";
    $("catalog").textContent = doc.catalog
      ? "serial " + num(doc.catalog.serial) + (doc.catalog.expired ? " (expired)" : "")
      : "none";
    const b = doc.bytes || {};
    $("wan-bytes").textContent = bytes(b.site_wan);
    $("lan-bytes").textContent = bytes(b.site_lan_in);
    $("lan-out-bytes").textContent = bytes(b.site_lan_out);
    const received = num(b.site_wan) + num(b.site_lan_in);
    const share = received ? (100 * num(b.site_wan)) / received : 0;
    $("wan-share").value = share;
    $("wan-share-text").textContent = received
      ? pct(share) + " over the WAN; this peer: WAN " + bytes(b.wan) + ", LAN " + bytes(b.lan_in)
      : "nothing received yet";
    document.title = "pxepeer " + str(doc.site, "") + (self.node_id ? " · " + self.node_id : "");
  }

  function stageList(machine) {
    const list = el("ol", "stages");
    const stages = Array.isArray(machine.stages) ? machine.stages : [];
    stages.forEach((s, i) => {
      const item = el("li", "stage" + (i === stages.length - 1 ? " last" : ""), str(s.stage, "?"));
      item.title = clock(s.at) + (s.detail ? ": " + s.detail : "");
      list.append(item);
    });
    return list;
  }

  function renderMachines(doc) {
    const rows = (doc.machines || []).map((m) => {
      const row = el("tr");
      row.dataset.mac = str(m.mac, "");
      cell(row, str(m.mac), "mono");
      cell(row, str(m.ip), "mono");
      cell(row, str(m.image), "text");
      const state = cell(row, str(m.state, m.last_stage ? "booting" : "–"), "state");
      if (m.state === "done" || m.state === "failed") state.classList.add("state-" + m.state);
      const progress = el("div", "progress");
      progress.append(bar(m.percent, "imaging progress of " + str(m.mac)));
      if (num(m.chunks_total) || num(m.size)) {
        progress.append(el("span", "bytes",
          num(m.chunks_done) + "/" + num(m.chunks_total) + " chunks, " +
          bytes(m.bytes_done) + " of " + bytes(m.size)));
      }
      cell(row, progress);
      cell(row, stageList(m));
      cell(row, str(m.message, ""), "message");
      return row;
    });
    fill($("machines"), rows);
  }

  function renderImages(doc) {
    const rows = (doc.images || []).map((image) => {
      const row = el("tr");
      const name = el("div", null, str(image.name) + " " + str(image.version, ""));
      const id = el("div", "muted mono", str(image.manifest_id, "").slice(0, 12));
      cell(row, name).append(id);
      const flags = el("div");
      if (image.paused) {
        const by = image.paused_by ? " (" + str(image.paused_by) + ")" : "";
        flags.append(el("span", "tag paused", "paused" + by));
      }
      if (image.priority) flags.append(el("span", "tag", "priority " + num(image.priority)));
      if (!image.in_catalog) flags.append(el("span", "tag", "local only"));
      if (image.wanted) flags.append(el("span", "tag", "wanted"));
      cell(row, flags);
      const holders = el("div");
      for (const h of image.holders || []) {
        const line = el("div", "holder");
        line.append(el("span", "node mono", str(h.node_id)), bar(h.percent, str(h.node_id)),
          el("span", "muted", num(h.have) + "/" + num(h.total) + " chunks"));
        holders.append(line);
      }
      cell(row, holders);
      return row;
    });
    fill($("images"), rows);
  }

  function renderPeers(doc) {
    const rows = (doc.peers || []).map((p) => {
      const row = el("tr");
      cell(row, str(p.node_id) + (p.self ? " (this peer)" : ""), "text mono");
      // "-": a peer with no --interface, reached on loopback or --listen addresses.
      const address = p.address && p.address !== "-" ? p.address : "";
      cell(row, address ? address + ":" + num(p.http_port) : "port " + num(p.http_port), "mono");
      const role = el("span", "tag" + (p.responder ? " responder" : ""),
        p.responder ? "responder" : p.can_answer_pxe ? "standby" : "peer");
      cell(row, role);
      cell(row, bytes(p.wan_bytes), "num");
      cell(row, bytes(p.lan_bytes_in), "num");
      cell(row, bytes(p.lan_bytes_out), "num");
      cell(row, p.self ? "–" : typeof p.last_seen_seconds === "number"
        ? p.last_seen_seconds.toFixed(0) + " s ago" : "–", "num");
      return row;
    });
    fill($("peers"), rows);
  }

  function renderWarnings(doc) {
    const w = doc.warnings || {};
    const current = (w.current || []).filter((t) => typeof t === "string");
    $("current-warnings").replaceChildren(...(current.length
      ? current.map((t) => el("li", null, t))
      : [el("li", "muted", "none now")]));
    const rows = (w.recent || []).map((r) => {
      const row = el("tr");
      cell(row, clock(r.at), "num");
      cell(row, str(r.level), "level level-" + str(r.level, "").replace(/[^A-Z]/g, ""));
      cell(row, str(r.logger), "text mono");
      cell(row, str(r.message), "message");
      return row;
    });
    fill($("warnings"), rows);
  }

  function render(doc) {
    renderOverview(doc);
    renderMachines(doc);
    renderImages(doc);
    renderPeers(doc);
    renderWarnings(doc);
  }

  // -- polling ----------------------------------------------------------------------------

  function connection(text, live) {
    const node = $("connection");
    node.textContent = text;
    node.classList.toggle("live", live);
    node.classList.toggle("down", !live);
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  function failed(what, err, deadline) {
    failures += 1;
    const wait = Math.min(MAX_BACKOFF_MS, POLL_MS * 2 ** Math.min(failures, 3));
    connection(what + " (" + String(err && err.message ? err.message : err) +
      "); trying again in " + Math.round(wait / 1000) + " s", false);
    clearTimeout(deadline);
    inFlight = false;
    schedule(wait);
  }

  async function poll() {
    if (inFlight) return;
    if (document.hidden) return; // resumed by visibilitychange
    inFlight = true;
    const abort = new AbortController();
    const deadline = setTimeout(() => abort.abort(), TIMEOUT_MS);
    let doc;
    let etag;
    try {
      // no-cache: revalidated with the ETag each time; an unchanged document is a 304.
      const response = await fetch(DOCUMENT, {
        cache: "no-cache", credentials: "same-origin", signal: abort.signal,
      });
      if (!response.ok) throw new Error("HTTP " + response.status);
      etag = response.headers.get("ETag");
      doc = await response.json();
      if (doc === null || typeof doc !== "object") throw new Error("not a dashboard document");
    } catch (err) {
      failed("cannot reach this peer", err, deadline);
      return;
    }
    try {
      // Unchanged: the page is left alone (an open tooltip or a selection stays).
      if (etag === null || etag !== lastEtag) render(doc);
      lastEtag = etag;
    } catch (err) {
      lastEtag = null;
      failed("cannot show what this peer sent", err, deadline);
      return;
    }
    failures = 0;
    connection("live · updated " + new Date().toLocaleTimeString(), true);
    clearTimeout(deadline);
    inFlight = false;
    schedule(POLL_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) schedule(0);
  });
  poll();
})();
