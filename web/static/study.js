/* Study page: the film viewer (zoom, pan, fit, 1:1, window/level, invert, full screen, heat-map toggle), the
   keyboard reading flow and the what-if threshold. All of it changes only what this page shows. */
(function () {
  "use strict";

  var HEATMAP_DEFAULT_KEY = "chestaid.heatmapDefault";
  // Display windows on the film's 0..1 grey values (not Hounsfield units: a radiograph has none).
  var PRESETS = {full: [1, 0.5], lung: [0.7, 0.4], soft: [0.45, 0.55], bone: [0.6, 0.72]};

  function $(id) { return document.getElementById(id); }
  function clamp(v, lo, hi) { return Math.min(hi, Math.max(lo, v)); }

  // --- viewer ---------------------------------------------------------------------------------------------
  function setupViewer() {
    var frame = $("film-frame"), stage = $("film-stage"), film = $("film-image"), overlay = $("heatmap-overlay");
    var viewer = $("viewer");
    if (!frame || !stage || !film || frame.dataset.ready) { return null; }
    frame.dataset.ready = "1";
    var st = {scale: 1, tx: 0, ty: 0, fit: true, window: 1, level: 0.5, inverted: false};
    var funcs = document.querySelectorAll("#wl-filter feFuncR, #wl-filter feFuncG, #wl-filter feFuncB");

    function size() {
      return [film.naturalWidth || Number(film.getAttribute("width")) || 1,
              film.naturalHeight || Number(film.getAttribute("height")) || 1];
    }
    function fitScale() {
      var wh = size();
      return Math.min(frame.clientWidth / wh[0], frame.clientHeight / wh[1]);
    }
    function render() {
      stage.style.transform = "translate(" + st.tx.toFixed(2) + "px, " + st.ty.toFixed(2) + "px) scale(" +
        st.scale.toFixed(5) + ")";
      // grey out = (grey in − level) / window + ½, clipped to 0..1; inverted: 1 − that.
      var slope = 1 / st.window, intercept = 0.5 - st.level / st.window;
      if (st.inverted) { slope = -slope; intercept = 1 - intercept; }
      Array.prototype.forEach.call(funcs, function (f) {
        f.setAttribute("slope", slope.toFixed(5));
        f.setAttribute("intercept", intercept.toFixed(5));
      });
      viewer.dataset.scale = st.scale.toFixed(4);
      viewer.dataset.window = st.window.toFixed(3);
      viewer.dataset.level = st.level.toFixed(3);
      var state = $("viewer-state");
      if (state) {
        state.textContent = (st.fit ? "Fit, " : "") + Math.round(st.scale * 100) + " % · window " +
          st.window.toFixed(2) + " level " + st.level.toFixed(2) + (st.inverted ? " · inverted" : "");
      }
      var inv = $("viewer-invert");
      if (inv) { inv.setAttribute("aria-pressed", String(st.inverted)); }
    }
    function fit() {
      var wh = size(), s = fitScale();
      st.scale = s; st.tx = (frame.clientWidth - wh[0] * s) / 2; st.ty = (frame.clientHeight - wh[1] * s) / 2;
      st.fit = true;
      render();
    }
    function zoomAt(factor, cx, cy) {
      var s = clamp(st.scale * factor, fitScale() / 4, 16);
      st.tx = cx - (cx - st.tx) * (s / st.scale);
      st.ty = cy - (cy - st.ty) * (s / st.scale);
      st.scale = s; st.fit = false;
      render();
    }
    function zoomCentre(factor) { zoomAt(factor, frame.clientWidth / 2, frame.clientHeight / 2); }
    function oneToOne() {
      // One film pixel per screen pixel, centred on what is in the middle of the frame now.
      zoomCentre(1 / (st.scale * (window.devicePixelRatio || 1)));
    }
    function windowLevel(width, level) {
      st.window = clamp(width, 0.05, 2); st.level = clamp(level, 0, 1);
      render();
    }
    function heatmap(on) {
      if (!overlay) { return; }
      overlay.hidden = !on;
      var button = $("heatmap-toggle");
      if (button) { button.setAttribute("aria-pressed", String(on)); }
    }

    frame.addEventListener("wheel", function (event) {
      event.preventDefault();
      var box = frame.getBoundingClientRect();
      zoomAt(Math.exp(-event.deltaY * 0.0015), event.clientX - box.left, event.clientY - box.top);
    }, {passive: false});

    // One pointer drags (pan, or window/level when chosen or with Shift); two pointers pinch-zoom.
    var pointers = {};
    function list() { return Object.keys(pointers).map(function (k) { return pointers[k]; }); }
    frame.addEventListener("pointerdown", function (event) {
      frame.setPointerCapture(event.pointerId);
      pointers[event.pointerId] = {x: event.clientX, y: event.clientY};
      frame.classList.add("dragging");
    });
    frame.addEventListener("pointermove", function (event) {
      var p = pointers[event.pointerId];
      if (!p) { return; }
      var all = list();
      if (all.length === 2) {
        var other = all[0] === p ? all[1] : all[0];
        var before = Math.hypot(p.x - other.x, p.y - other.y);
        var after = Math.hypot(event.clientX - other.x, event.clientY - other.y);
        var box = frame.getBoundingClientRect();
        if (before > 0) {
          zoomAt(after / before, (event.clientX + other.x) / 2 - box.left, (event.clientY + other.y) / 2 - box.top);
        }
      } else if (all.length === 1) {
        var dx = event.clientX - p.x, dy = event.clientY - p.y;
        if (event.shiftKey || ($("wl-drag") && $("wl-drag").checked)) {
          windowLevel(st.window * Math.exp(dx / 200), st.level - dy / 400);
        } else {
          st.tx += dx; st.ty += dy; st.fit = false;
          render();
        }
      }
      p.x = event.clientX; p.y = event.clientY;
    });
    function release(event) {
      delete pointers[event.pointerId];
      if (!list().length) { frame.classList.remove("dragging"); }
    }
    frame.addEventListener("pointerup", release);
    frame.addEventListener("pointercancel", release);

    var actions = {
      "zoom-in": function () { zoomCentre(1.25); }, "zoom-out": function () { zoomCentre(0.8); },
      "fit": fit, "one": oneToOne,
      "invert": function () { st.inverted = !st.inverted; render(); },
      "wl-reset": function () { windowLevel(1, 0.5); if ($("wl-preset")) { $("wl-preset").value = "full"; } },
      "heatmap": function () { heatmap(overlay && overlay.hidden); },
      "fullscreen": function () {
        if (document.fullscreenElement) { document.exitFullscreen(); } else if (viewer.requestFullscreen) { viewer.requestFullscreen(); }
      }
    };
    viewer.addEventListener("click", function (event) {
      var button = event.target.closest ? event.target.closest("[data-act]") : null;
      if (button && actions[button.dataset.act]) { actions[button.dataset.act](); }
    });
    var preset = $("wl-preset");
    if (preset) {
      preset.addEventListener("change", function () {
        var p = PRESETS[preset.value] || PRESETS.full;
        windowLevel(p[0], p[1]);
      });
    }
    // The heat-map's default (shown or not when a study opens) is the reader's choice, kept in this browser.
    var setting = $("heatmap-default");
    var shown = window.localStorage.getItem(HEATMAP_DEFAULT_KEY) !== "off";
    if (setting) {
      setting.checked = shown;
      setting.addEventListener("change", function () {
        window.localStorage.setItem(HEATMAP_DEFAULT_KEY, setting.checked ? "on" : "off");
      });
    }
    heatmap(shown);
    document.addEventListener("fullscreenchange", fit);
    window.addEventListener("resize", function () { if (st.fit) { fit(); } });
    if (film.complete && film.naturalWidth) { fit(); } else { film.addEventListener("load", fit); fit(); }
    return actions;
  }

  function setupOpacity() {
    var slider = $("alpha"), overlay = $("heatmap-overlay"), output = $("alpha-value");
    if (!slider || !overlay) { return; }
    function apply() {
      overlay.style.opacity = String(Number(slider.value) / 100);
      if (output) { output.textContent = slider.value + " %"; }
    }
    slider.addEventListener("input", apply);
    apply();
  }

  // --- what-if threshold ----------------------------------------------------------------------------------
  // Score and threshold are shown with as many digits as it takes for the shown numbers to agree with the
  // comparison (never "1.000 < 1.000"): three, or more while rounding would make two different values equal.
  function digitsFor(a, b) {
    for (var d = 3; d < 10; d++) {
      if (a === b || Number(a).toFixed(d) !== Number(b).toFixed(d)) { return d; }
    }
    return 10;
  }

  function setupWhatIf() {
    var slider = $("whatif"), number = $("whatif-number"), decision = $("decision");
    var output = $("whatif-value"), reset = $("whatif-reset");
    if (!slider || !decision) { return; }
    // The score is read once from the page and never written: only the decision text follows the threshold.
    var score = Number(slider.dataset.score);
    var inForce = Number(slider.dataset.threshold);
    var threshold = inForce;

    function apply() {
      var whatIf = Math.abs(threshold - inForce) > 1e-12;
      var flagged = score >= threshold;
      var d = digitsFor(score, threshold);
      var text = flagged
        ? "FLAGGED for priority reading: score " + score.toFixed(d) + " \u2265 threshold " + threshold.toFixed(d)
        : "Not flagged: score " + score.toFixed(d) + " < threshold " + threshold.toFixed(d);
      decision.textContent = (whatIf ? "What-if: " : "") + text;
      decision.classList.toggle("decision-flagged", flagged);
      decision.classList.toggle("decision-clear", !flagged);
      decision.classList.toggle("decision-whatif", whatIf);
      if (output) { output.textContent = threshold.toFixed(d) + (whatIf ? " (what-if)" : " (in force)"); }
      if (reset) { reset.disabled = !whatIf; }
    }
    function fromSlider() {
      threshold = Number(slider.value);
      if (number) { number.value = String(threshold); }
      apply();
    }
    slider.addEventListener("input", fromSlider);
    if (number) {
      number.addEventListener("input", function () {
        var v = Number(number.value);
        var valid = number.value !== "" && isFinite(v) && v >= 0 && v <= 1;
        number.setAttribute("aria-invalid", String(!valid));
        if (!valid) { return; }  // the decision keeps the last valid threshold
        threshold = v;
        slider.value = String(v);
        apply();
      });
    }
    if (reset) {
      reset.addEventListener("click", function () {
        threshold = inForce; slider.value = String(inForce);
        if (number) { number.value = String(inForce); number.setAttribute("aria-invalid", "false"); }
        apply();
      });
    }
    apply();
  }

  // --- keyboard reading flow ------------------------------------------------------------------------------
  function typing(target) {
    // Letters typed into a text field are text; on a checkbox, radio, button or slider they are shortcuts.
    if (!target) { return false; }
    if (target.tagName === "INPUT") { return !/^(checkbox|radio|button|submit|reset|range)$/.test(target.type); }
    return target.isContentEditable || /^(TEXTAREA|SELECT)$/.test(target.tagName);
  }

  function recordAndNext(finding) {
    var form = document.querySelector("form.feedback-form");
    var radio = form && form.querySelector('input[name=finding][value="' + finding + '"]');
    if (!radio) { return false; }
    radio.checked = true;
    form.requestSubmit($("record-next"));  // the button's then=next goes along with the form
    return true;
  }

  var viewerActions = null;  // the viewer of the page shown (a page swapped in by htmx gets a new one)

  function setupKeys() {
    if (document.body.dataset.studyKeys) { return; }
    document.body.dataset.studyKeys = "1";
    var keys = {"+": "zoom-in", "=": "zoom-in", "-": "zoom-out", "0": "fit", "1": "one", "i": "invert",
                "w": "wl-reset", "f": "fullscreen", "h": "heatmap", "H": "heatmap"};
    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) { return; }
      if (document.querySelector("dialog[open]")) { return; }
      var act = viewerActions && keys[event.key] && viewerActions[keys[event.key]];
      if (act) { act(); event.preventDefault(); return; }
      if ((event.key === "p" || event.key === "n") && recordAndNext(event.key === "p" ? "pneumonia" : "normal")) {
        event.preventDefault();
      } else if (event.key === "Escape" && !document.fullscreenElement) {
        window.location.assign("/");
      }
    });
  }

  function init() {
    viewerActions = setupViewer() || viewerActions;
    setupOpacity(); setupWhatIf(); setupKeys();
  }
  // A study that was still being scored is swapped in place by htmx once ready; wire up its controls.
  document.addEventListener("htmx:afterSettle", init);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
