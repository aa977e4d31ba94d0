/* Study page: heat-map opacity and the what-if threshold. Both change only what this page shows. */
(function () {
  "use strict";

  function formatScore(value) { return Number(value).toFixed(3); }

  function setupOpacity() {
    var slider = document.getElementById("alpha");
    var overlay = document.getElementById("heatmap-overlay");
    var output = document.getElementById("alpha-value");
    if (!slider || !overlay) { return; }
    function apply() {
      overlay.style.opacity = String(Number(slider.value) / 100);
      if (output) { output.textContent = slider.value + " %"; }
    }
    slider.addEventListener("input", apply);
    apply();
  }

  function setupWhatIf() {
    var slider = document.getElementById("whatif");
    var decision = document.getElementById("decision");
    var output = document.getElementById("whatif-value");
    var reset = document.getElementById("whatif-reset");
    if (!slider || !decision) { return; }
    // The score is read once from the page and never written: only the decision text follows the slider.
    var score = Number(slider.dataset.score);
    var inForce = Number(slider.dataset.threshold);

    function apply() {
      var threshold = Number(slider.value);
      var whatIf = Math.abs(threshold - inForce) > 1e-9;
      var flagged = score >= threshold;
      var text = flagged
        ? "FLAGGED for priority reading: score " + formatScore(score) + " \u2265 threshold " + formatScore(threshold)
        : "Not flagged: score " + formatScore(score) + " < threshold " + formatScore(threshold);
      decision.textContent = (whatIf ? "What-if: " : "") + text;
      decision.classList.toggle("decision-flagged", flagged);
      decision.classList.toggle("decision-clear", !flagged);
      decision.classList.toggle("decision-whatif", whatIf);
      if (output) { output.textContent = formatScore(threshold) + (whatIf ? " (what-if)" : " (in force)"); }
      if (reset) { reset.disabled = !whatIf; }
    }

    slider.addEventListener("input", apply);
    if (reset) {
      reset.addEventListener("click", function () { slider.value = String(inForce); apply(); });
    }
    apply();
  }

  function init() { setupOpacity(); setupWhatIf(); }
  // A study that was still being scored is swapped in place by htmx once ready; wire up its controls.
  document.addEventListener("htmx:afterSettle", init);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
