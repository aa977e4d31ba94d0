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

  document.addEventListener("htmx:sendError", function () { setStale(true); });
  document.addEventListener("htmx:responseError", function () { setStale(true); });
  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail && event.detail.successful) { setStale(false); }
  });
})();
