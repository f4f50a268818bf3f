"""The offline docs site (`python tools/build_site.py`): one page per notebook, math as MathML, no error output,
navigation that resolves, nothing fetched from outside, and headless Chromium renders it (screenshots checked).

The site is built once per module into a temporary folder (about 30-40 s: nbdev's processing runs the
notebooks' import, export and `show_doc` cells). The browser tests need Debian's Chromium:
`apt-get update && apt-get install -y chromium fonts-stix` (fonts-stix: a math font; MathML renders without it too).
"""
import html, importlib.util, json, re, shutil, subprocess, sys
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
        self.html, self.links, self.ids, self.text, self.stack, self.source = html, [], set(), [], [], None
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
    for name, p in pages.items():
        for tag, attr, url in p.links:
            if re.match(r"^(https?:|mailto:|data:)", url): continue
            path, _, anchor = url.partition("#")
            target = (site / path) if path else site / name
            assert target.is_file(), f"{name}: {tag} {attr}={url} does not exist"
            if anchor and target.suffix == ".html":
                assert anchor in pages[target.name].ids, f"{name}: anchor {url} missing"


def test_nothing_is_loaded_from_outside(site, pages):
    for name, p in pages.items():
        for tag, attr, url in p.links:
            if tag != "a": assert not re.match(r"^(https?:)?//", url), f"{name}: external {tag} {url}"
    for css in site.rglob("*.css"):
        assert not re.search(r"(@import|url\()\s*['\"]?(https?:)?//", css.read_text()), css.name


def test_saved_outputs_render_images_and_errors_visibly():
    "The renderer on a made-up notebook: embedded plot, stream, show_doc markdown, error output made visible."
    spec = importlib.util.spec_from_file_location("build_site", ROOT / "tools" / "build_site.py")
    bs = sys.modules["build_site"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)
    page = bs.Page(bs.Site(ROOT), "x.ipynb", "x.html", "x")
    png = {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=\n", "text/plain": "<Figure>"}}
    err = {"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": ["\x1b[31mTraceback\x1b[0m"]}
    cell = {"cell_type": "code", "source": "#| code-fold: true\nplot()", "outputs": [
        png, {"output_type": "stream", "name": "stdout", "text": ["a < b\n"]}, err]}
    h = bs.cell_html(page, cell, "python")
    assert '<img src="data:image/png;base64,iVBORw0KGgo="' in h and "a &lt; b" in h
    assert "output-error" in h and "\x1b" not in h and "code-fold" not in h and "<details" in h
    md = bs.cell_html(page, {"cell_type": "markdown", "source": "## A $x^2$\n\n$$\\frac{a}{b}$$"}, "python")
    assert '<h2 id="a-x2">' in md and md.count("<math") == 2 and "<mfrac>" in md
    assert bs.cell_html(page, {"cell_type": "code", "source": "#| include: false\nx", "outputs": [png]}, "python") == ""


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
