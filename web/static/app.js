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
