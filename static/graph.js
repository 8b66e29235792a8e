// The graph page (templates/graph.html): hover, side panel, pins, hidden edges, groups.
// Plain JS, no build. Pins and groups live in the URL (?pin=ID&group=NAME:ID,ID), so changing
// them reloads the page, which the server draws again; hidden edges are this page's only.
// Labels are user data: they are only ever set as textContent.
(function () {
  "use strict";

  function start() {
    var svg = document.getElementById("graph");
    if (!svg) return;
    var slug = svg.dataset.slug;
    var tip = document.getElementById("graph-tip");
    var panel = document.getElementById("node-panel");

    function edgesOf(id) {
      return svg.querySelectorAll(
        'line[data-source="' + CSS.escape(id) + '"], line[data-target="' + CSS.escape(id) + '"]'
      );
    }

    function withParams(change) {
      var url = new URL(window.location.href);
      change(url.searchParams);
      window.location.assign(url.toString());
    }

    svg.addEventListener("mouseover", function (event) {
      var node = event.target.closest(".node");
      if (!node) return;
      var d = node.dataset;
      var lines = [d.label || "(no label)", "layer " + d.layer + " · position " + d.position];
      if (d.activation) lines.push("activation " + d.activation);
      if (d.influence) lines.push("influence " + d.influence);
      tip.textContent = lines.join("\n");
      tip.style.whiteSpace = "pre-line";
      tip.hidden = false;
      edgesOf(d.node).forEach(function (l) { l.classList.add("lit"); });
    });
    svg.addEventListener("mousemove", function (event) {
      tip.style.left = event.clientX + 14 + "px";
      tip.style.top = event.clientY + 14 + "px";
    });
    svg.addEventListener("mouseout", function (event) {
      var node = event.target.closest(".node");
      if (!node) return;
      tip.hidden = true;
      edgesOf(node.dataset.node).forEach(function (l) { l.classList.remove("lit"); });
    });

    svg.addEventListener("click", function (event) {
      var node = event.target.closest(".node");
      if (!node) return;
      if (event.shiftKey) {
        node.classList.toggle("selected");
        return;
      }
      var url = "/graphs/" + encodeURIComponent(slug) + "/-/fragments/nodes/" + encodeURIComponent(node.dataset.node);
      htmx.ajax("GET", url, { target: "#node-panel", swap: "innerHTML" });
    });

    panel.addEventListener("click", function (event) {
      var button = event.target.closest("button[data-node]");
      if (!button) return;
      var id = button.dataset.node;
      if (button.classList.contains("pin")) {
        withParams(function (params) {
          var pins = params.getAll("pin");
          params.delete("pin");
          var kept = pins.filter(function (p) { return p !== id; });
          if (kept.length === pins.length) kept.push(id);
          kept.forEach(function (p) { params.append("pin", p); });
        });
      } else if (button.classList.contains("hide-edges")) {
        edgesOf(id).forEach(function (l) { l.classList.toggle("hidden"); });
      }
    });

    document.getElementById("group-button").addEventListener("click", function () {
      var name = document.getElementById("group-name").value.trim();
      var ids = Array.prototype.map.call(svg.querySelectorAll(".node.selected"), function (n) {
        return n.dataset.node;
      });
      if (!name || ids.length === 0) {
        window.alert("shift-click the nodes to group, and give the group a name");
        return;
      }
      withParams(function (params) { params.append("group", name + ":" + ids.join(",")); });
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
