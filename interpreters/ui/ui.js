// stroma ui: click (or Enter on) an attempt bar, or a row of the attempts table, to see
// the attempt's input and output state, failure message and usage. No build step.
(function () {
  "use strict";
  var source = document.getElementById("timeline-data");
  if (!source) { return; }
  var data = JSON.parse(source.textContent);
  var panel = document.getElementById("detail");

  function text(id, value) {
    var el = document.getElementById(id);
    el.textContent = value === null || value === undefined || value === "" ? "—" : String(value);
  }

  function pretty(value) {
    return value === null || value === undefined ? "—" : JSON.stringify(value, null, 2);
  }

  function show(index) {
    var parts = index.split(":");
    var row = data.rows[Number(parts[0])];
    var bar = row && row.bars[Number(parts[1])];
    if (!bar) { return; }
    text("detail-title", row.label + " · attempt " + bar.attempt);
    var outcome = document.getElementById("detail-outcome");
    outcome.textContent = bar.outcome;
    outcome.className = "status s-" + bar.outcome.replace(/[ /]/g, "-");
    text("detail-group", bar.group_attempt);
    text("detail-start", bar.start + " (+" + Math.round(bar.offset_ms) + " ms)");
    text("detail-duration", bar.duration_ms + " ms");
    text("detail-message", bar.message);
    var u = bar.usage;
    text("detail-usage", u.tokens ? (u.input_tokens + " in / " + u.output_tokens + " out") : "");
    text("detail-model", u.model);
    text("detail-cost", u.cost_usd ? "$" + u.cost_usd.toFixed(6) : "");
    text("detail-hooks", bar.hook_errors.join("; "));
    document.getElementById("detail-input").textContent = pretty(bar.input_state);
    document.getElementById("detail-output").textContent = pretty(bar.output_state);
    panel.hidden = false;
    panel.setAttribute("data-index", index);
    document.querySelectorAll(".selected").forEach(function (el) {
      el.classList.remove("selected");
    });
    document.querySelectorAll('[data-index="' + index + '"]').forEach(function (el) {
      el.classList.add("selected");
    });
    if (history.replaceState) { history.replaceState(null, "", "#attempt=" + index); }
  }

  document.querySelectorAll("svg .bar, tr[data-index]").forEach(function (el) {
    el.setAttribute("tabindex", "0");
    el.addEventListener("click", function () { show(el.getAttribute("data-index")); });
    el.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        show(el.getAttribute("data-index"));
      }
    });
  });
  var hash = /^#attempt=(\d+:\d+)$/.exec(location.hash);
  if (hash) { show(hash[1]); }
}());
