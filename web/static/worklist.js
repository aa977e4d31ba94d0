/* Worklist page: live updates that keep focus and selection, arrival announcements, keyboard reading flow and
   whole-row links. No inline scripts: the page runs under a strict CSP. */
(function () {
  "use strict";

  var selectedId = null;  // the study id of the row the keyboard selection is on (kept across refreshes)

  function rows() { return Array.prototype.slice.call(document.querySelectorAll("main tbody tr[data-study-id]")); }
  function rowOf(id) { return id ? document.querySelector('main tbody tr[data-study-id="' + id + '"]') : null; }
  function linkOf(row) { return row ? row.querySelector("a[href^='/studies/']") : null; }
  function idsIn(body) {
    return Array.prototype.map.call(body.querySelectorAll("tr[data-study-id]"),
                                    function (tr) { return tr.getAttribute("data-study-id"); });
  }

  function select(row, focus) {
    rows().forEach(function (tr) { tr.classList.remove("row-selected"); tr.removeAttribute("aria-selected"); });
    if (!row) { selectedId = null; return; }
    selectedId = row.getAttribute("data-study-id");
    row.classList.add("row-selected");
    row.setAttribute("aria-selected", "true");
    var link = linkOf(row);
    if (focus && link) {
      link.focus({preventScroll: true});
      row.scrollIntoView({block: "nearest"});
    }
  }

  // --- live updates ---------------------------------------------------------------------------------------
  // Each table body the poll sends is compared with the one shown: an unchanged body is not swapped at all, so
  // focus, selection and the screen reader's place stay put. A changed body is swapped and the focus and
  // selection are put back on the same study (by id), wherever it moved.
  var shownHtml = {};   // body id -> the server HTML it shows (before any class the page adds)
  var shownIds = {};    // body id -> study ids it shows
  var focusedId = null;
  var swapping = {};    // body id -> true while a changed body is being swapped in

  // Ticking labels (app.js) change by themselves; a body is "unchanged" when only their text differs.
  function steady(html) { return html.replace(/(<time class="tick"[^>]*>)[^<]*(<\/time>)/g, "$1$2"); }

  function remember(body) {
    shownHtml[body.id] = steady(body.innerHTML);
    shownIds[body.id] = idsIn(body);
  }

  function announce(text) {
    var live = document.getElementById("arrivals");
    if (!live || !text) { return; }
    // A repeated text is re-announced only when it changes; a trailing dot toggles it.
    live.textContent = live.textContent === text ? text + "." : text;
  }

  function arrivals(body, before) {
    var fresh = idsIn(body).filter(function (id) { return before.indexOf(id) < 0; });
    if (!fresh.length) { return; }
    var flagged = fresh.filter(function (id) {
      var tr = body.querySelector('tr[data-study-id="' + id + '"]');
      return tr && tr.classList.contains("row-flagged");
    }).length;
    var text = fresh.length === 1 ? "1 new study to read" : fresh.length + " new studies to read";
    if (flagged) { text += ", " + flagged + " flagged"; }
    announce(text + ".");
  }

  document.addEventListener("htmx:oobBeforeSwap", function (event) {
    var target = event.detail.target;
    if (!target || target.tagName !== "TBODY") { return; }
    var incoming = event.detail.fragment.querySelector("tbody");
    if (incoming && shownHtml[target.id] === steady(incoming.innerHTML)) {
      event.detail.shouldSwap = false;  // nothing changed in this list
      return;
    }
    swapping[target.id] = true;
    var active = document.activeElement;
    var row = active && target.contains(active) ? active.closest("tr[data-study-id]") : null;
    focusedId = row ? row.getAttribute("data-study-id") : focusedId;
  });

  document.addEventListener("htmx:oobAfterSwap", function (event) {
    var target = event.detail.target;
    if (!target || !target.id || !swapping[target.id]) { return; }
    delete swapping[target.id];
    var body = document.getElementById(target.id);
    if (!body) { return; }
    var before = shownIds[body.id] || [];
    remember(body);
    if (body.id === "body-unread") { arrivals(body, before); }
    if (selectedId && body.contains(rowOf(selectedId))) { select(rowOf(selectedId), false); }
    if (focusedId && (document.activeElement === document.body || !document.activeElement)) {
      var link = linkOf(rowOf(focusedId));
      if (link) { link.focus({preventScroll: true}); }
    }
    focusedId = null;
  });

  // --- keyboard reading flow --------------------------------------------------------------------------------
  function typing(target) {
    // Letters typed into a text field are text; on a checkbox, radio, button or slider they are shortcuts.
    if (!target) { return false; }
    if (target.tagName === "INPUT") { return !/^(checkbox|radio|button|submit|reset|range)$/.test(target.type); }
    return target.isContentEditable || /^(TEXTAREA|SELECT)$/.test(target.tagName);
  }

  function move(step) {
    var all = rows();
    if (!all.length) { return; }
    var current = all.indexOf(rowOf(selectedId));
    var next = current < 0 ? (step > 0 ? 0 : all.length - 1) : Math.min(all.length - 1, Math.max(0, current + step));
    select(all[next], true);
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) { return; }
    if (document.querySelector("dialog[open]")) { return; }
    if (event.key === "j" || event.key === "ArrowDown") { move(1); event.preventDefault(); }
    else if (event.key === "k" || event.key === "ArrowUp") { move(-1); event.preventDefault(); }
    else if (event.key === "Enter" && selectedId && !(event.target.closest && event.target.closest("a, button"))) {
      var link = linkOf(rowOf(selectedId));
      if (link) { window.location.assign(link.href); event.preventDefault(); }
    } else if (event.key === "/") {
      var search = document.getElementById("search-q");
      if (search) { search.focus(); event.preventDefault(); }
    }
  });

  // Focus moved by Tab (or a click) onto a row's link selects that row too.
  document.addEventListener("focusin", function (event) {
    var row = event.target.closest ? event.target.closest("main tbody tr[data-study-id]") : null;
    if (row && row.getAttribute("data-study-id") !== selectedId) { select(row, false); }
  });

  // Whole rows open their study; links, buttons and selected text keep their own behaviour.
  document.addEventListener("click", function (event) {
    var row = event.target.closest ? event.target.closest("main tbody tr[data-study-id]") : null;
    if (!row || event.target.closest("a, button, input, label")) { return; }
    if (window.getSelection && String(window.getSelection()).length) { return; }
    var link = linkOf(row);
    if (link) { window.location.assign(link.href); }
  });

  // Empty search and filter fields are left out of the address, so it reads as what was asked.
  document.addEventListener("submit", function (event) {
    if (!event.target || event.target.id !== "finder") { return; }
    Array.prototype.forEach.call(event.target.elements, function (field) {
      if (field.name && (field.value === "" || (field.name === "sort" && field.value === "triage"))) {
        field.disabled = true;
      }
    });
  });

  function init() {
    Array.prototype.forEach.call(document.querySelectorAll("main tbody[id^='body-']"), remember);
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); } else { init(); }
})();
