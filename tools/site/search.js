// Offline search for the jigsaw_ref docs: the index (window.JIGSAW_SEARCH, written by tools/build_site.py into
// search_index.js) holds every page's sections; nothing is fetched, so it works from file:// too.
// Every word typed must occur in a section (its heading, its page's title or its text); headings weigh most.
// `page.html?q=words` opens a page with the results for `words` shown; "/" focuses the box, Esc closes it.
(function () {
  "use strict";
  const base = new URL(".", document.currentScript.src);  // the site's root, wherever this page lies
  const MAX = 20;

  function terms(q) { return q.toLowerCase().split(/\s+/).filter(Boolean); }

  function count(hay, t) {
    let n = 0, i = hay.indexOf(t);
    while (i !== -1 && n < 20) { n++; i = hay.indexOf(t, i + t.length); }
    return n;
  }

  function search(q) {
    const idx = window.JIGSAW_SEARCH, ts = terms(q);
    if (!idx || !ts.length) return [];
    const hits = [];
    for (const [p, anchor, heading, text] of idx.entries) {
      const h = heading.toLowerCase(), title = idx.pages[p][1].toLowerCase(), body = text.toLowerCase();
      let score = 0, ok = true;
      for (const t of ts) {
        const inH = h.includes(t), inT = title.includes(t), n = count(body, t);
        if (!inH && !inT && !n) { ok = false; break; }
        score += (h === t ? 80 : h.endsWith("." + t) ? 50 : 0) + (inH ? 25 : 0) + (inT ? 6 : 0) + Math.min(n, 10);
      }
      if (ok) hits.push({score: anchor ? score : score - 1, p, anchor, heading, text});
    }
    hits.sort((a, b) => b.score - a.score);
    return hits.slice(0, MAX);
  }

  function snippet(text, ts) {
    const low = text.toLowerCase();
    let at = -1;
    for (const t of ts) { const i = low.indexOf(t); if (i !== -1 && (at === -1 || i < at)) at = i; }
    const start = Math.max(0, at - 60), s = text.slice(start, start + 180);
    return (start > 0 ? "…" : "") + s + (start + 180 < text.length ? "…" : "");
  }

  function marked(el, s, ts) {  // text with the query words in <mark>, built from text nodes (no HTML injection)
    const re = new RegExp("(" + ts.map(t => t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|") + ")", "ig");
    s.split(re).forEach((part, k) => {
      if (k % 2) { const m = document.createElement("mark"); m.textContent = part; el.append(m); }
      else if (part) el.append(document.createTextNode(part));
    });
  }

  function show(box, q) {
    const ts = terms(q), hits = search(q), idx = window.JIGSAW_SEARCH;
    box.replaceChildren();
    if (!ts.length) { box.hidden = true; return; }
    const head = document.createElement("p");
    head.className = "search-count";
    head.textContent = !idx ? "The search index (search_index.js) is missing." :
      hits.length ? `${hits.length === MAX ? "Top " : ""}${hits.length} result${hits.length > 1 ? "s" : ""}` : "No results";
    box.append(head);
    const ol = document.createElement("ol");
    for (const h of hits) {
      const [href, title] = idx.pages[h.p];
      const a = document.createElement("a");
      a.className = "search-hit";
      a.href = new URL(href + (h.anchor ? "#" + h.anchor : ""), base).href;
      const t = document.createElement("span"); t.className = "search-title"; marked(t, h.heading, ts);
      const pg = document.createElement("span"); pg.className = "search-page"; pg.textContent = title;
      const sn = document.createElement("span"); sn.className = "search-snippet"; marked(sn, snippet(h.text, ts), ts);
      a.append(t, pg, sn);
      const li = document.createElement("li"); li.append(a); ol.append(li);
    }
    box.append(ol);
    box.hidden = false;
  }

  function init() {
    const input = document.getElementById("search"), box = document.getElementById("search-results");
    if (!input || !box) return;
    input.addEventListener("input", () => show(box, input.value));
    input.addEventListener("focus", () => { if (input.value) show(box, input.value); });
    input.addEventListener("keydown", e => {
      if (e.key === "Escape") { box.hidden = true; input.blur(); }
      if (e.key === "Enter") { const a = box.querySelector("a.search-hit"); if (a) location.href = a.href; }
    });
    document.addEventListener("keydown", e => {
      if (e.key === "/" && document.activeElement !== input) { e.preventDefault(); input.focus(); }
    });
    document.addEventListener("click", e => { if (!e.target.closest(".search")) box.hidden = true; });
    const q = new URLSearchParams(location.search).get("q");
    if (q) { input.value = q; show(box, q); }
  }

  window.jigsawSearch = search;  // for the tests and the console
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
