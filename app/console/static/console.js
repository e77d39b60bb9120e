// The console's one script: charts (uPlot) drawn from JSON the page carries, the copy button
// of a new key, and a confirmation before a revocation. No inline script: the CSP forbids it.
"use strict";

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

const CHARTS = {
  requests: [["requests", "Requests", "--s1"], ["errors", "Errors", "--s2"]],
  tokens: [["input_tokens", "Input", "--s1"], ["output_tokens", "Output", "--s3"],
    ["cached_tokens", "Cached", "--s4"]],
};

function drawChart(element) {
  const source = document.getElementById(element.dataset.source);
  if (!source || typeof uPlot === "undefined") return;
  const data = JSON.parse(source.textContent);
  const lines = CHARTS[element.dataset.chart];
  const axis = { stroke: css("--muted"), grid: { stroke: css("--line") }, ticks: { stroke: css("--line") } };
  const options = {
    width: Math.max(element.clientWidth, 200),
    height: 240,
    series: [{}].concat(lines.map(([, label, color]) => ({
      label: label, stroke: css(color), width: 2, points: { show: data.t.length < 40 },
    }))),
    axes: [Object.assign({}, axis), Object.assign({ size: 60 }, axis)],
    scales: { y: { range: (u, min, max) => [0, Math.max(max, 1) * 1.1] } },
  };
  const columns = [data.t].concat(lines.map(([field]) => data[field]));
  element.replaceChildren();
  const plot = new uPlot(options, columns, element);
  element.dataset.drawn = "true";
  new ResizeObserver(() => plot.setSize({ width: Math.max(element.clientWidth, 200), height: 240 }))
    .observe(element);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".chart").forEach(drawChart);
  document.querySelectorAll("[data-copy]").forEach((button) => {
    button.addEventListener("click", async () => {
      const field = document.getElementById(button.dataset.copy);
      field.select();
      try {
        await navigator.clipboard.writeText(field.value);
      } catch (e) {
        document.execCommand("copy");
      }
      button.textContent = "Copied";
    });
  });
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
});
