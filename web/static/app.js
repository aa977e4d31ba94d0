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

  document.addEventListener("htmx:sendError", function () { setStale(true); });
  document.addEventListener("htmx:responseError", function () { setStale(true); });
  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail && event.detail.successful) { setStale(false); }
  });
})();
