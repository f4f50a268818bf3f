"""The offline docs site (`python tools/build_site.py`): one page per notebook, math as MathML, no error output,
navigation that resolves, nothing fetched from outside, classes shown as classes with their methods, figures from
saved outputs, local "source" pages, marked `%%px` cells, an offline search, and headless Chromium renders it
(screenshots checked, a search typed and its results read back).

The site is built once per module into a temporary folder (1.5 to 5 minutes on a 2-core machine, depending on
its load: nbdev's processing runs the notebooks' import, export and `show_doc` cells). The browser tests need Debian's Chromium:
`apt-get update && apt-get install -y chromium fonts-stix` (fonts-stix: a math font; MathML renders without it too).
"""
import html, importlib, importlib.util, inspect, json, re, shutil, subprocess, sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
INSTALL = "apt-get update && apt-get install -y chromium fonts-stix"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def notebooks():
    return sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith(("_", ".")))


class Page(HTMLParser):
    "What the tests read off a page: links, ids, text outside code, sidebar hrefs, the notebook it came from."
    def __init__(self, html: str):
        super().__init__()
        self.html, self.links, self.ids, self.text, self.code, self.stack, self.source = html, [], set(), [], [], [], None
        sidebar = re.search(r'<nav class="sidebar".*?</nav>', html, re.S)
        self.nav = re.findall(r'href="([^"]+)"', sidebar[0]) if sidebar else []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.stack.append(tag)
        if "id" in a: self.ids.add(a["id"])
        self.links += [(tag, k, a[k]) for k in ("href", "src") if a.get(k) is not None]

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag: pass

    def handle_data(self, data):
        if not {"code", "pre", "script", "style"} & set(self.stack): self.text.append(data)
        if "pre" in self.stack: self.code.append(data)
        if "footer" in self.stack and "code" in self.stack and data.endswith(".ipynb"): self.source = data


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "_site"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_site.py"), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"build_site.py failed:\n{r.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def pages(site):
    return {p.name: Page(p.read_text()) for p in sorted(site.glob("*.html"))}


@pytest.fixture(scope="module")
def bs():
    "tools/build_site.py as a module (its renderer, tested on made-up cells)."
    spec = importlib.util.spec_from_file_location("build_site", ROOT / "tools" / "build_site.py")
    mod = sys.modules["build_site"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def settings(key):
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"][key]


def test_every_notebook_has_a_page_and_the_home_page_is_index(site, pages):
    built_from = {p.source: name for name, p in pages.items()}
    assert sorted(built_from) == sorted(nb.name for nb in notebooks())
    assert built_from["index.ipynb"] == "index.html"


def test_sidebar_lists_every_page_in_notebook_order_with_prev_next(pages):
    order = [name for name, _ in sorted(((n, p.source) for n, p in pages.items()),
                                        key=lambda x: (x[1] != "index.ipynb", x[1]))]
    for name, p in pages.items():
        assert p.nav == order, name
        i = order.index(name)
        if i > 0: assert f'class="prev" href="{order[i - 1]}"' in p.html, name
        if i + 1 < len(order): assert f'class="next" href="{order[i + 1]}"' in p.html, name


def test_math_is_rendered_as_mathml_and_no_tex_delimiters_are_left(pages):
    with_math = {nb.name for nb in notebooks()
                 if any("$" in "".join(c["source"]) for c in json.loads(nb.read_text())["cells"]
                        if c["cell_type"] == "markdown")}
    assert with_math, "expected some notebook with LaTeX"
    for name, p in pages.items():
        text = "".join(p.text)
        if p.source in with_math: assert "<math" in p.html, name
        assert "$$" not in text, name
        assert not re.search(r"\$[^\s$][^$\n]*\\[a-zA-Z]+[^$\n]*\$", text), f"raw inline TeX left in {name}"
        assert "math-error" not in p.html, f"LaTeX that did not convert in {name}"


def test_no_page_shows_an_error_output(pages):
    for name, p in pages.items():
        assert "output-error" not in p.html and "Traceback" not in p.html, name


def test_links_and_anchors_resolve_to_files_in_the_site(site, pages):
    parsed = dict(pages)
    for name, p in pages.items():
        for tag, attr, url in p.links:
            if re.match(r"^(https?:|mailto:|data:)", url): continue
            path, _, anchor = url.partition("#")
            target = (site / path) if path else site / name
            assert target.is_file(), f"{name}: {tag} {attr}={url} does not exist"
            if anchor and target.suffix == ".html":
                key = target.relative_to(site).as_posix()
                if key not in parsed: parsed[key] = Page(target.read_text())
                assert anchor in parsed[key].ids, f"{name}: anchor {url} missing"


def test_nothing_is_loaded_from_outside(site, pages):
    for f in site.rglob("*.html"):
        p = pages.get(f.name) if f.parent == site else Page(f.read_text())
        for tag, attr, url in p.links:
            if tag != "a": assert not re.match(r"^(https?:)?//", url), f"{f.name}: external {tag} {url}"
    for css in site.rglob("*.css"):
        assert not re.search(r"(@import|url\()\s*['\"]?(https?:)?//", css.read_text()), css.name
    for js in site.rglob("*.js"):  # the scripts load nothing; the index is data (page text, URLs in it are text)
        text = js.read_text()
        if js.name == "search_index.js": assert text.startswith("window.JIGSAW_SEARCH = {"), js.name
        else: assert not re.search(r"\b(fetch|XMLHttpRequest|importScripts|import)\b|https?://", text), js.name


def test_saved_outputs_render_images_and_errors_visibly(bs):
    "The renderer on a made-up notebook: embedded plot, stream, show_doc markdown, error output made visible."
    page = bs.Page(bs.Site(ROOT), "x.ipynb", "x.html", "x")
    png = {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=\n", "text/plain": "<Figure>"},
           "metadata": {"image/png": {"width": 562, "height": 294}}}
    err = {"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": ["\x1b[31mTraceback\x1b[0m"]}
    cell = {"cell_type": "code", "source": "#| code-fold: true\nplot()", "outputs": [
        png, {"output_type": "stream", "name": "stdout", "text": ["a < b\n"]}, err]}
    h = bs.cell_html(page, cell, "python")
    assert '<img class="output-image" src="data:image/png;base64,iVBORw0KGgo=" width="562" height="294"' in h
    assert "a &lt; b" in h
    assert "output-error" in h and "\x1b" not in h and "code-fold" not in h and "<details" in h
    md = bs.cell_html(page, {"cell_type": "markdown", "source": "## A $x^2$\n\n$$\\frac{a}{b}$$"}, "python")
    assert '<h2 id="a-x2">' in md and md.count("<math") == 2 and "<mfrac>" in md
    assert bs.cell_html(page, {"cell_type": "code", "source": "#| include: false\nx", "outputs": [png]}, "python") == ""
    # a figure from a cell whose code is not shown (`#| echo: false`) is still shown; `Image(width=)` is kept
    fig = bs.cell_html(page, {"cell_type": "code", "source": "#| echo: false\nplt.show()", "outputs": [png]}, "python")
    assert "output-image" in fig and "plt.show" not in fig
    img = {"output_type": "execute_result", "data": {"image/png": ["iVBOR", "w0KGgo="], "text/plain": "<Image>"},
           "metadata": {"image/png": {"width": 560}}}
    h = bs.cell_html(page, {"cell_type": "code", "source": "Image(filename=f, width=560)", "outputs": [img]}, "python")
    assert 'src="data:image/png;base64,iVBORw0KGgo=" width="560" alt' in h


def test_px_cells_keep_their_magic_a_badge_and_their_outputs(bs):
    "An ipyparallel `%%px` cell: the magic line stays, a badge says it runs on the engines, its outputs show."
    class Cell(dict):  # what nbdev's processors see: attribute access
        __getattr__ = dict.__getitem__
        def __setattr__(self, k, v): self[k] = v
    c = Cell(cell_type="code", source="%%px --progress-after -1\n#| mpi\n%time x = 1\nprint(world.rank)")
    bs.keep_px_magics(c)
    assert c.source.startswith("%%px --progress-after -1\n") and "%time" not in c.source and "print(world.rank)" in c.source
    page = bs.Page(bs.Site(ROOT), "x.ipynb", "x.html", "x")
    outs = [{"output_type": "stream", "name": "stdout", "text": "[stdout:0] rank 0 of 4\n"},
            {"output_type": "display_data", "data": {"text/plain": "[output:1] done"}, "metadata": {}}]
    h = bs.cell_html(page, {"cell_type": "code", "source": c.source, "outputs": outs}, "python")
    assert 'class="cell cell-px"' in h and "px-badge" in h and "%%px" in re.sub(r"<[^>]+>", "", h)
    assert "[stdout:0] rank 0 of 4" in h and "[output:1] done" in h and "#| mpi" not in h
    plain = bs.cell_html(page, {"cell_type": "code", "source": "x = 1", "outputs": []}, "python")
    assert "px-badge" not in plain and "cell-px" not in plain


def test_class_signature_and_members_from_the_module(bs):
    "`def Name(...)->None:` becomes `class Name(...)`; public members listed unless the page documents them."
    from jigsaw_ref.parallel import JigsawMixer
    md = "### JigsawMixer\n\n```python\ndef JigsawMixer(\n    cfg:MixerConfig, tensor:Group\n)->None:\n```\n\n*doc*"
    out = bs.class_md(md, JigsawMixer)
    assert "```python\nclass JigsawMixer(\n    cfg:MixerConfig, tensor:Group\n)\n```" in out and "def JigsawMixer" not in out
    assert "Bases: `torch.nn.Module`" in out
    err = bs.class_md("### E\n\n```python\ndef E(\n    *args, **kwargs\n):\n```", type("E", (ValueError,), {}))
    assert "```python\nclass E(ValueError)\n```" in err
    names = [n for n, _, _ in bs.members(JigsawMixer, {"JigsawMixer.encode"}, "jigsaw_ref")]
    assert {"forward", "state", "sync_replicated_grads"} <= set(names) and "encode" not in names
    assert not [n for n in names if n.startswith("_")] and "zero_grad" not in names  # nn.Module's own are not listed
    fwd = dict((n, (k, f)) for n, k, f in bs.members(JigsawMixer, set(), "jigsaw_ref"))["forward"]
    text = bs.member_md(JigsawMixer, "forward", *fwd)
    assert text.startswith("#### JigsawMixer.forward\n\n```python\ndef forward(") and JigsawMixer.forward.__doc__ in text


def lib_classes():
    "(page file, class) for every class the library exports, from nbdev's index (jigsaw_ref/_modidx.py)."
    from jigsaw_ref._modidx import d
    out = []
    for mod, syms in d["syms"].items():
        m = importlib.import_module(mod)
        for full, (doc, _) in syms.items():
            name = full[len(mod) + 1:]
            obj = getattr(m, name, None) if "." not in name and not name.startswith("_") else None
            if inspect.isclass(obj) and obj.__module__ == mod: out.append((doc.split("#")[0], obj))
    return out


def test_classes_are_rendered_as_classes_with_their_public_methods(pages):
    "Every exported class reads `class Name(`, never `def Name(`, and each public method or property has an entry."
    classes = lib_classes()
    assert {c.__name__ for _, c in classes} >= {"JigsawMixer", "Trainer", "Group", "MixerConfig"}
    for href, cls in classes:
        p, cid = pages[href], cls.__name__.lower()
        assert cid in p.ids, f"{href}: no entry for class {cls.__name__}"
        code = "".join(p.code)
        assert not re.search(rf"\bdef {cls.__name__}\(", code), f"{href}: {cls.__name__} shown as a function"
        assert re.search(rf"\bclass {cls.__name__}\b", code), f"{href}: no `class {cls.__name__}` signature"
        for k, v in vars(cls).items():
            fn = v.fget if isinstance(v, property) else getattr(v, "__func__", v)
            if k.startswith("_") or not (inspect.isfunction(fn) and fn.__module__.startswith("jigsaw_ref")): continue
            assert f"{cid}.{k.lower()}" in p.ids, f"{href}: {cls.__name__}.{k} is not documented"
    for href, names in {"parallel.html": ["JigsawMixer.forward", "JigsawMixer.state", "JigsawMixer.sync_replicated_grads"],
                        "train.html": ["Trainer.fit"]}.items():
        for n in names:
            assert n.lower() in pages[href].ids, f"{href}: {n}"
            m = re.search(rf'<h4 id="{re.escape(n.lower())}">.*?</div>', pages[href].html, re.S) or \
                re.search(rf'<h3 id="{re.escape(n.lower())}">.*?</div>', pages[href].html, re.S)
            assert m and "def " in html.unescape(re.sub(r"<[^>]+>", "", m[0])), f"{href}: {n} has no signature"


FIGURE_PAGES = {"perf_model.html": "13_perf_model", "evaluate.html": "10_evaluate", "partitioned_matmul.html": "05_partitioned_matmul",
                "plan.html": "13a_plan"}


@pytest.mark.parametrize("page", list(FIGURE_PAGES))
def test_pages_show_their_figures(pages, page):
    "The pages whose text refers to plots show at least one figure from a saved notebook output."
    n = pages[page].html.count('<img class="output-image"')
    nb = FIGURE_PAGES[page]
    assert n >= 1, (f"{page}: no figure. nbs/{nb}.ipynb has no saved image output: the plot cell must display its "
                    f"figure (inline, not under matplotlib.use('Agg'), or `IPython.display.Image`) and the notebook "
                    f"must be executed (`python tools/run_nbs.py {nb}`)")


def test_source_links_go_to_local_copies_of_the_modules(site, pages):
    "No link to the repository (settings.ini's git_url); every 'source' link opens the module's copy at its line."
    git = settings("git_url").rstrip("/")
    n = 0
    for name, p in pages.items():
        assert git not in p.html, f"{name} links to the repository {git}"
        for href in re.findall(r'<a class="source-link" href="([^"]+)"', p.html):
            n += 1
            path, _, anchor = href.partition("#")
            assert path.startswith("src/") and (site / path).is_file(), f"{name}: source link {href}"
            assert re.fullmatch(r"L-\d+", anchor) and f'id="{anchor}"' in (site / path).read_text(), f"{name}: {href}"
    assert n > 50, f"only {n} source links"
    src = (site / "src" / "jigsaw_ref" / "parallel.py.html").read_text()
    line = next(i for i, l in enumerate((ROOT / "jigsaw_ref" / "parallel.py").read_text().splitlines(), 1)
                if l.startswith("class JigsawMixer"))
    assert re.search(rf'<span id="L-{line}">.*class.*JigsawMixer', src), "the copy's line anchors are off"


def test_mpi_notebook_marks_every_px_cell(pages):
    "Each `%%px` cell of nbs/14 is shown with its magic line and the engines badge."
    nb = json.loads((NBS / "14_mpi_notebook.ipynb").read_text())
    px = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).lstrip().startswith("%%px")]
    p = pages["mpi_notebook.html"]
    assert px and p.html.count('class="px-badge"') == len(px), (len(px), p.html.count('class="px-badge"'))
    assert "".join(p.code).count("%%px") >= len(px)
    for c in px:  # saved outputs (the notebook executed on a cluster) are shown
        for o in c.get("outputs", []):
            t = "".join(o.get("text", "")) or "".join((o.get("data") or {}).get("text/plain", ""))
            if t.strip(): assert html.escape(t.strip().splitlines()[0]) in p.html, t[:80]


def search_index(site):
    js = (site / "search_index.js").read_text()
    prefix = "window.JIGSAW_SEARCH = "
    assert js.startswith(prefix) and js.rstrip().endswith(";")
    return json.loads(js[len(prefix):].rstrip().rstrip(";"))


def test_search_index_covers_every_page(site, pages):
    idx = search_index(site)
    hrefs = [h for h, _ in idx["pages"]]
    assert sorted(hrefs) == sorted(pages)
    per_page = {k: [e for e in idx["entries"] if e[0] == k] for k in range(len(hrefs))}
    for k, es in per_page.items():
        assert es and sum(len(e[3]) for e in es) > 200, f"{hrefs[k]}: nothing indexed"
        for e in es:
            assert not e[1] or e[1] in pages[hrefs[k]].ids, f"{hrefs[k]}: index anchor {e[1]} not on the page"
    comm = hrefs.index("comm.html")
    assert any(e[0] == comm and e[1] == "reduce_scatter" for e in idx["entries"])
    for name, p in pages.items():
        assert 'id="search"' in p.html and 'src="search_index.js"' in p.html and 'src="search.js"' in p.html, name


# ---------------------------------------------------------------- headless Chromium
def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail(f"Chromium is not installed; the docs browser check needs it. Install with: {INSTALL}")
    return exe


def run_chromium(tmp_path, *args):
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    r = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("page", ["index.html", "mixer.html"])
def test_browser_screenshot_is_not_blank(site, tmp_path, page):
    import matplotlib.image as mpimg
    png = tmp_path / f"{Path(page).stem}.png"
    run_chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,2000", (site / page).as_uri())
    assert png.is_file() and png.stat().st_size > 30_000, f"screenshot missing or tiny: {png}"
    img = mpimg.imread(png)[..., :3].mean(axis=-1)
    assert img.shape == (2000, 1280)
    assert img.std() > 0.1, f"screenshot looks blank (pixel std {img.std():.3f}): {png}"
    assert (img < 0.5).mean() > 0.02, f"too little dark content (text) in {png}"
    print(f"screenshot: {png}")


def test_browser_lays_out_math(site, tmp_path):
    "Chromium lays the mixer page's MathML out as math: subscripts lowered, limits under sums, nothing empty."
    probe = """<script>
const ms = [...document.querySelectorAll('math')].filter(m => !m.closest('details:not([open])'));
const box = e => e.getBoundingClientRect();
const r = {n: ms.length, display: ms.length ? getComputedStyle(ms[0]).display : '',
           empty: ms.filter(m => box(m).width < 1 || box(m).height < 1).length};
const sub = document.querySelector('main msub');
if (sub) r.sub_lowered = box(sub.children[1]).bottom > box(sub.children[0]).bottom + 1;
const fr = document.querySelector('main mfrac');
if (fr) r.frac_stacked = box(fr.children[0]).bottom <= box(fr.children[1]).top + 1;
const un = document.querySelector('main .display-math munder');
if (un) r.under_stacked = box(un.children[1]).top >= box(un.children[0]).bottom - 2;
const out = document.createElement('pre');
out.id = 'mathcheck';
out.textContent = JSON.stringify(r);
document.body.append(out);
</script>"""
    check = site / "_mathcheck.html"
    check.write_text((site / "mixer.html").read_text().replace("</body>", probe + "</body>"))
    try:
        dom = run_chromium(tmp_path, "--dump-dom", "--window-size=1280,2000", check.as_uri())
    finally:
        check.unlink()
    m = re.findall(r'<pre id="mathcheck">(.*?)</pre>', dom)
    assert m, "the probe script did not run"
    r = json.loads(html.unescape(m[-1]))
    print("math layout:", r)
    assert r["n"] > 5 and r["empty"] == 0 and "math" in r["display"], r
    assert r.get("sub_lowered") is True, r
    assert r.get("frac_stacked", True) is True and r.get("under_stacked", True) is True, r
    assert "frac_stacked" in r or "under_stacked" in r, f"no fraction or sum with limits to check: {r}"


def search_hits(dom):
    return [html.unescape(h) for h in re.findall(r'<a class="search-hit" href="([^"]+)"', dom)]


def test_browser_search_from_the_url(site, tmp_path):
    "`index.html?q=reduce_scatter` opens with results, the first the comm page's `reduce_scatter`."
    dom = run_chromium(tmp_path, "--dump-dom", "--window-size=1280,900", (site / "index.html").as_uri() + "?q=reduce_scatter")
    hits = search_hits(dom)
    print("hits:", hits[:5])
    assert hits, "no search results in the page"
    assert hits[0] == (site / "comm.html").as_uri() + "#reduce_scatter", hits[:5]
    assert 'id="search-results" class="search-results"' in dom and "search-results\" hidden" not in dom


def test_browser_search_typed_into_the_box(site, tmp_path):
    "Typing `reduce_scatter` into the box of a module-source page (two folders down) lists the comm page."
    probe = """<script>
document.addEventListener('DOMContentLoaded', () => {  // after search.js has set the box up
  const input = document.getElementById('search');
  for (const ch of 'reduce_scatter') { input.value += ch; input.dispatchEvent(new Event('input', {bubbles: true})); }
  const box = document.getElementById('search-results');
  const out = document.createElement('pre');
  out.id = 'searchcheck';
  out.textContent = JSON.stringify({hidden: box.hidden, hits: [...box.querySelectorAll('a.search-hit')].map(a => a.href),
                                    count: [...document.querySelectorAll('.search-count')].map(e => e.textContent)});
  document.body.append(out);
});
</script>"""
    src = site / "src" / "jigsaw_ref" / "comm.py.html"
    check = src.with_name("_searchcheck.html")
    check.write_text(src.read_text().replace("</body>", probe + "</body>"))
    try:
        dom = run_chromium(tmp_path, "--dump-dom", "--window-size=1280,900", check.as_uri())
    finally:
        check.unlink()
    m = re.findall(r'<pre id="searchcheck">(.*?)</pre>', dom)
    assert m, "the probe script did not run"
    r = json.loads(html.unescape(m[-1]))
    print("typed search:", r["hits"][:5], r["count"])
    assert not r["hidden"] and (site / "comm.html").as_uri() + "#reduce_scatter" in r["hits"], r
