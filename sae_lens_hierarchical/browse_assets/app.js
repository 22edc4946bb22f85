// The index of an `hsae browse` site: the collapsible tree and the search box, built from
// window.HSAE_INDEX (data/index.js). Children are rendered when a node is first opened, so a
// 16k-latent tree costs one list of roots at load.
(function () {
  "use strict";
  var D = window.HSAE_INDEX;
  var n = D.parent.length;
  var total = Math.max(D.n_tokens, 1);
  var kids = [];
  for (var i = 0; i < n; i++) kids.push([]);
  for (var j = 0; j < n; j++) if (D.parent[j] >= 0) kids[D.parent[j]].push(j);
  var byCount = function (a, b) { return D.count[b] - D.count[a] || a - b; };
  kids.forEach(function (k) { k.sort(byCount); });

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function pct(j) { return (100 * D.count[j] / total).toFixed(2) + "%"; }
  function link(j) {
    var a = el("a", { href: "latents/" + j + ".html" }, "#" + j);
    return a;
  }

  function node(j) {
    var li = el("li", { "data-latent": j });
    var live = kids[j].filter(function (c) { return D.count[c] > 0; });
    var dead = kids[j].length - live.length;
    var toggle = el("button", { "class": "toggle", "aria-expanded": "false", "aria-label": "expand #" + j },
      live.length ? "▸" : "·");
    if (!live.length) toggle.disabled = true;
    li.appendChild(toggle);
    li.appendChild(link(j));
    li.appendChild(el("span", { "class": "label" }, " " + D.label[j] + " "));
    li.appendChild(el("span", { "class": "density" }, pct(j)));
    if (kids[j].length) {
      li.appendChild(el("span", { "class": "kids" },
        " · " + live.length + (live.length === 1 ? " child" : " children") + (dead ? ", " + dead + " dead" : "")));
    }
    var ul = null;
    toggle.addEventListener("click", function () {
      if (!ul) {
        ul = el("ul");
        live.forEach(function (c) { ul.appendChild(node(c)); });
        li.appendChild(ul);
      } else {
        ul.hidden = !ul.hidden;
      }
      var open = !ul.hidden;
      toggle.textContent = open ? "▾" : "▸";
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
    });
    return li;
  }

  document.title = D.name + " · feature tree";
  document.getElementById("title").textContent = D.name + ": " + D.architecture;
  document.getElementById("about").textContent =
    (D.model || "?") + ", " + D.hook + " · " + D.d_sae + " latents, " + D.n_live + " fire on the " +
    D.n_tokens + " tokens read · shown on " + D.tree_label + ".";

  var head = Object.keys(D.headline || {});
  if (head.length) {
    var t = el("table", { "class": "headline" });
    head.forEach(function (k) {
      var tr = el("tr");
      tr.appendChild(el("td", {}, k));
      var v = D.headline[k];
      tr.appendChild(el("td", {}, typeof v === "number" ? v.toPrecision(4) : String(v)));
      t.appendChild(tr);
    });
    document.getElementById("headline").appendChild(t);
  }

  var lv = el("table", { "class": "levels" });
  var hr = el("tr");
  ["level", "latents", "L0", "dead", "prefix EV"].forEach(function (h) { hr.appendChild(el("th", {}, h)); });
  lv.appendChild(hr);
  D.levels.forEach(function (r) {
    var tr = el("tr");
    [r.level, r.width, r.l0.toFixed(2), r.dead, r.prefix_ev === null ? "–" : r.prefix_ev.toFixed(3)]
      .forEach(function (v) { tr.appendChild(el("td", {}, String(v))); });
    lv.appendChild(tr);
  });
  document.getElementById("levels").appendChild(lv);

  var tree = document.getElementById("tree");
  var roots = [], outside = [];
  for (var r = 0; r < n; r++) {
    if (D.parent[r] >= 0 || D.count[r] === 0) continue;
    (D.level[r] === 0 ? roots : outside).push(r);
  }
  roots.sort(byCount).forEach(function (j) { tree.appendChild(node(j)); });
  if (outside.length) {
    var li = el("li", { "class": "outside" }, "Outside the tree (" + outside.length + " live latents with no parent)");
    var ul = el("ul");
    outside.sort(byCount).slice(0, 200).forEach(function (j) { ul.appendChild(node(j)); });
    li.appendChild(ul);
    tree.appendChild(li);
  }

  var search = document.getElementById("search");
  var results = document.getElementById("results");
  search.addEventListener("input", function () {
    var q = search.value.trim().toLowerCase();
    results.textContent = "";
    if (!q) return;
    var hits = [];
    if (/^#?\d+$/.test(q)) {
      var id = parseInt(q.replace("#", ""), 10);
      if (id < n) hits.push(id);
    } else {
      for (var j = 0; j < n && hits.length < 50; j++) {
        if (D.count[j] > 0 && (D.label[j].toLowerCase().indexOf(q) >= 0 || D.search[j].toLowerCase().indexOf(q) >= 0)) hits.push(j);
      }
    }
    if (!hits.length) { results.appendChild(el("li", { "class": "none" }, "no latent matches " + q)); return; }
    hits.forEach(function (j) {
      var li = el("li");
      if (D.count[j] > 0) li.appendChild(link(j)); else li.appendChild(el("span", { "class": "dead" }, "#" + j + " (dead)"));
      li.appendChild(el("span", { "class": "label" }, " " + D.label[j] + " "));
      li.appendChild(el("span", { "class": "density" }, "level " + D.level[j] + " · " + pct(j)));
      results.appendChild(li);
    });
  });
})();
