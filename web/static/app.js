/* Chest-Aid page behaviour shared by all pages (no inline scripts: the pages run under a strict CSP). */
(function () {
  "use strict";

  // A worklist that silently stops updating is dangerous: say so when polling fails.
  function setStale(stale) {
    var warning = document.getElementById("stale-warning");
    if (warning) { warning.hidden = !stale; }
  }

  // Every htmx request carries the session's CSRF token (from the page's meta tag) as a header.
  document.addEventListener("htmx:configRequest", function (event) {
    var meta = document.querySelector('meta[name="csrf-token"]');
    if (meta && meta.content) { event.detail.headers["X-CSRF-Token"] = meta.content; }
  });

  // The poller sends the version (ETag) of what it shows; an unchanged worklist answers 304 with no body,
  // so an idle worklist costs the server a few index reads and the page nothing. Then only the clock moves.
  var shownVersion = null;
  document.addEventListener("htmx:configRequest", function (event) {
    if (event.detail.elt && event.detail.elt.id === "poller" && shownVersion) {
      event.detail.headers["If-None-Match"] = shownVersion;
    }
  });
  document.addEventListener("htmx:afterRequest", function (event) {
    var xhr = event.detail && event.detail.xhr;
    if (!xhr || !event.detail.elt || event.detail.elt.id !== "poller") { return; }
    if (xhr.status === 200 && xhr.getResponseHeader("ETag")) { shownVersion = xhr.getResponseHeader("ETag"); }
    if (xhr.status === 304) {
      var clock = document.querySelector("#status-strip time");
      var now = new Date();
      if (clock) {
        clock.setAttribute("datetime", now.toISOString());
        clock.textContent = now.toTimeString().slice(0, 8);
      }
    }
  });

  // Waiting times and "open for" labels tick here, every second: each <time class="tick"> counts from its
  // datetime on the server's clock. The server leaves them out of a page's version (web/poll.py), so an idle
  // worklist is answered 304 while its times still move.
  var serverAhead = 0;  // ms the server's clock is ahead of this browser's, from the newest strip it sent
  function syncClock(root, arrived) {
    var t = root && root.querySelector ? root.querySelector("#status-strip time[datetime]") : null;
    var at = t ? Date.parse(t.getAttribute("datetime")) : NaN;
    if (!isNaN(at) && !isNaN(arrived)) { serverAhead = at - arrived; }
  }
  function waitedText(seconds) {  // as web/templating.py `waited`
    var s = Math.max(0, Math.floor(seconds)), m = Math.floor(s / 60), h = Math.floor(s / 3600);
    if (s < 60) { return s + " s"; }
    if (h === 0) { return m + " min"; }
    if (h < 48) { return h + " h " + (m % 60 < 10 ? "0" : "") + (m % 60) + " min"; }
    return Math.floor(h / 24) + " d " + (h % 24) + " h";
  }
  function openText(seconds) {  // as web/templating.py `open_for`
    var m = Math.floor(Math.max(0, seconds) / 60);
    return m === 0 ? "under a minute" : m + " min";
  }
  function tick(root) {
    var now = Date.now() + serverAhead;
    Array.prototype.forEach.call((root || document).querySelectorAll("time.tick[datetime]"), function (el) {
      var since = Date.parse(el.getAttribute("datetime"));
      if (isNaN(since)) { return; }
      var text = el.getAttribute("data-tick") === "open" ? openText((now - since) / 1000)
                                                          : waitedText((now - since) / 1000);
      if (el.textContent !== text) { el.textContent = text; }
    });
  }
  // The page's strip: its time is when the server rendered it, just before the response's first byte came
  // (performance timing: true also for a page brought back from the history cache hours later).
  var nav = window.performance && performance.getEntriesByType ? performance.getEntriesByType("navigation")[0] : null;
  syncClock(document, nav ? performance.timeOrigin + nav.responseStart : Date.now());
  document.addEventListener("htmx:oobBeforeSwap", function (event) {
    if (event.detail.target && event.detail.target.id === "status-strip") {
      syncClock(event.detail.fragment, Date.now());
    }
  }, true);
  document.addEventListener("htmx:afterSwap", function (event) { tick(event.detail.elt); });
  window.ChestAidTick = tick;
  window.setInterval(function () { tick(document); }, 1000);

  // "?" shows the keyboard shortcuts: a <dialog> every signed-in page carries (Esc or its button closes it).
  function typing(target) {
    // Letters typed into a text field are text; on a checkbox, radio, button or slider they are shortcuts.
    if (!target) { return false; }
    if (target.tagName === "INPUT") { return !/^(checkbox|radio|button|submit|reset|range)$/.test(target.type); }
    return target.isContentEditable || /^(TEXTAREA|SELECT)$/.test(target.tagName);
  }
  function showShortcuts() {
    var dialog = document.getElementById("shortcuts");
    if (dialog && !dialog.open) { dialog.showModal(); }
  }
  document.addEventListener("keydown", function (event) {
    if (event.key === "?" && !event.ctrlKey && !event.metaKey && !event.altKey && !typing(event.target)) {
      showShortcuts();
      event.preventDefault();
    }
  });
  document.addEventListener("click", function (event) {
    var target = event.target.closest ? event.target : null;
    if (target && target.closest("#shortcuts-open")) { showShortcuts(); }
    if (target && target.closest("#shortcuts-close")) { document.getElementById("shortcuts").close(); }
  });

  // Times are sent in the server's zone and shown in the reader's own, with the zone named ("… CET").
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function zoneName(date) {
    try {
      var part = new Intl.DateTimeFormat(undefined, {timeZoneName: "short"}).formatToParts(date)
        .filter(function (p) { return p.type === "timeZoneName"; })[0];
      if (part) { return part.value; }
    } catch (e) { /* an old browser: the offset below */ }
    var minutes = -date.getTimezoneOffset();
    return "UTC" + (minutes < 0 ? "−" : "+") + pad(Math.floor(Math.abs(minutes) / 60)) + ":" + pad(Math.abs(minutes) % 60);
  }
  function localiseTimes(root) {
    Array.prototype.forEach.call((root || document).querySelectorAll("time.local-time[datetime]"), function (el) {
      var date = new Date(el.getAttribute("datetime"));
      if (isNaN(date.getTime())) { return; }
      el.textContent = date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) + " " +
        pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds()) + " " + zoneName(date);
      el.title = "Your local time (" + (Intl.DateTimeFormat().resolvedOptions().timeZone || zoneName(date)) + ")";
    });
  }
  window.ChestAid = {localiseTimes: localiseTimes};
  // Content swapped in by htmx is localised before it is compared or shown (worklist.js compares bodies).
  document.addEventListener("htmx:oobBeforeSwap", function (event) { localiseTimes(event.detail.fragment); }, true);
  document.addEventListener("htmx:afterSwap", function (event) { localiseTimes(event.detail.elt); });
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { localiseTimes(document); });
  } else {
    localiseTimes(document);
  }

  document.addEventListener("htmx:sendError", function () { setStale(true); });
  document.addEventListener("htmx:responseError", function () { setStale(true); });
  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail && event.detail.successful) { setStale(false); }
  });
})();
