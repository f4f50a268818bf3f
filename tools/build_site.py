"""Build the docs site offline: `python tools/build_site.py [--out _site]` from the repository root.

1. nbdev's own notebook processing (the `FilterDefaults` processors that `nbdev_proc_nbs` runs: `show_doc`
   for exported names, `#| hide` cells dropped, doc links, frontmatter), one subprocess per notebook, into a
   temporary folder. The `nbdev_proc_nbs` command itself is not used: without Quarto it tries to download
   Quarto, and it rewrites nbs/_quarto.yml, nbs/sidebar.yml and jigsaw_ref/_modidx.py.
2. Each processed notebook becomes one HTML page (tools/site/page.html) showing the outputs saved in the
   notebook (nothing else is executed; images embedded), Quarto cell options honoured (`#| echo: false`,
   `output`, `include`, `eval`, `code-fold`), markdown by mistune (nbconvert's own renderer), LaTeX turned
   into MathML at build time by latex2mathml (the browser renders MathML natively: no script, no CDN).
3. A sidebar with every page in notebook order, an on-this-page list, prev/next links; links to the hosted
   docs (`doc_host` + `doc_baseurl`) and to `*.ipynb` are rewritten to the local pages.
"""
from __future__ import annotations

import argparse, configparser, html, json, os, re, shutil, subprocess, sys, tempfile, unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jinja2, mistune, yaml
from markupsafe import Markup
from mistune.plugins.math import math_in_list, math_in_quote
from latex2mathml.converter import convert as latex_to_mathml
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "site"
MARKER = ".jigsaw_site"  # marks a folder this script built, so --out never wipes anything else
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DIRECTIVE = re.compile(r"^\s*#\|\s*(.*?)\s*$")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}

# nbdev's processing of one notebook, exactly what `nbdev_proc_nbs` does per file (nbdev.serve_drv.main)
PROC = ("import sys; from pathlib import Path; from nbdev.serve_drv import main; "
        "from nbdev.processors import FilterDefaults; main((Path(sys.argv[1]), Path(sys.argv[2]), FilterDefaults))")


def log(*a): print("build_site:", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- notebooks -> processed notebooks
def notebooks(nbs: Path) -> list[Path]:
    "Every `nbs/*.ipynb` not starting with `_` or `.`, index first, then in file-name (notebook) order."
    nbl = sorted(p for p in nbs.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    return sorted(nbl, key=lambda p: p.stem != "index")


def process(nbl: list[Path], dest: Path, jobs: int, timeout: float) -> dict[Path, Path]:
    "Run nbdev's processors on each notebook in its own subprocess (cwd = the notebook's folder)."
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}

    def one(src: Path):
        dst = dest / src.name
        try:
            r = subprocess.run([sys.executable, "-c", PROC, str(src), str(dst)], cwd=src.parent, env=env,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return src, f"nbdev processing took over {timeout:.0f} s"
        if r.returncode or not dst.exists():
            return src, f"nbdev processing failed (exit {r.returncode}):\n" + (r.stderr or r.stdout)[-3000:]
        return src, None

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        errs = [(s, e) for s, e in ex.map(one, nbl) if e]
    if errs:
        for s, e in errs: log(f"{s.name}: {e}")
        raise SystemExit(f"build_site: {len(errs)} notebook(s) failed: {', '.join(s.name for s, _ in errs)}")
    return {src: dest / src.name for src in nbl}


# ---------------------------------------------------------------- markdown + math
VARIANT = re.compile(r'<(mi|mn|mo)([^>]*?) mathvariant="([a-z-]+)"([^>]*)>([^<]*)</\1>')
VARIANT_NAMES = {"bold": "BOLD", "italic": "ITALIC", "bold-italic": "BOLD ITALIC", "double-struck": "DOUBLE-STRUCK",
                 "script": "SCRIPT", "bold-script": "BOLD SCRIPT", "fraktur": "FRAKTUR", "bold-fraktur": "BOLD FRAKTUR",
                 "sans-serif": "SANS-SERIF", "bold-sans-serif": "SANS-SERIF BOLD", "monospace": "MONOSPACE",
                 "sans-serif-italic": "SANS-SERIF ITALIC", "sans-serif-bold-italic": "SANS-SERIF BOLD ITALIC"}
UNSUPPORTED = re.compile(r"<mi>\\[A-Za-z]+</mi>|<mi>&amp;</mi>|<mi>&</mi>")


def styled_char(c: str, variant: str) -> str:
    "`R`, double-struck -> the Unicode letter ℝ (MathML Core, hence Chromium, ignores `mathvariant`)."
    try: name = unicodedata.name(c)
    except ValueError: return c
    base = re.sub(r"^(LATIN|GREEK) (CAPITAL|SMALL) LETTER ", r"\2 ", name)
    if base == name and not name.startswith("DIGIT "): return c
    style = VARIANT_NAMES[variant]
    for n in (f"MATHEMATICAL {style} {base}", f"{style} {base}", f"BLACK-LETTER {base}" if "FRAKTUR" in style else "",
              "PLANCK CONSTANT" if (style, base) == ("ITALIC", "SMALL H") else ""):
        try: return unicodedata.lookup(n) if n else c
        except KeyError: continue
    return c


def mathvariants(mml: str) -> str:
    def sub(m):
        tag, pre, variant, post, text = m.groups()
        if variant not in VARIANT_NAMES: return m[0]
        styled = "".join(styled_char(c, variant) for c in html.unescape(text))
        return f"<{tag}{pre}{post}>{html.escape(styled, quote=False)}</{tag}>"
    return VARIANT.sub(sub, mml)


def math_html(tex: str, display: bool, where: str = "") -> str:
    "LaTeX -> MathML (display math in a centred block); a formula that fails shows as red code, with a warning."
    tex = html.unescape(tex).strip()
    fixed = re.sub(r"\\(begin|end)\{aligned\}", r"\\\1{split}", tex)  # latex2mathml knows split, not aligned
    try:
        mml = mathvariants(latex_to_mathml(fixed, display="block" if display else "inline"))
    except Exception as e:  # latex2mathml raises on unbalanced input
        log(f"{where}: cannot convert LaTeX {tex!r}: {type(e).__name__}: {e}")
        return f'<code class="math-error">{html.escape(tex)}</code>'
    if UNSUPPORTED.search(mml):  # an unknown command or a stray & comes out as text: make it visible
        log(f"{where}: LaTeX not fully supported by latex2mathml: {tex!r}")
        mml = f'<span class="math-error" title="unsupported LaTeX">{mml}</span>'
    return f'<span class="display-math">{mml}</span>' if display else mml


def slug(text: str) -> str:
    "Pandoc's heading identifier (what Quarto and nbdev's doc links use): lower case, [a-z0-9_.-], spaces to -."
    t = re.sub(r"<[^>]+>", "", html.unescape(text)).strip().lower()
    t = re.sub(r"\s+", "-", t)
    t = re.sub(r"[^\w.\-]", "", t)
    return re.sub(r"^[^a-z]+", "", t) or "section"


class Renderer(mistune.HTMLRenderer):
    "mistune's HTML renderer with heading ids, MathML math and links rewritten to the local site."
    def __init__(self, page: "Page"):
        super().__init__(escape=False)
        self.page = page

    def heading(self, text, level, **attrs):
        hid = self.page.anchor(text)
        if level in (2, 3) and self.page.in_toc:
            self.page.toc.append((level, hid, Markup(re.sub(r"</?a\b[^>]*>", "", text))))  # math kept, links not
        return f'<h{level} id="{hid}">{text}</h{level}>\n'

    def block_math(self, text): return math_html(text, True, self.page.source)
    def inline_math(self, text): return math_html(text, False, self.page.source)
    def link(self, text, url, title=None): return super().link(text, self.page.site.fix_url(url), title)
    def block_code(self, code, info=None): return code_html(code, (info or "text").split()[0])

    def image(self, text, url, title=None):
        if url.startswith("attachment:"):
            url = self.page.attachments.get(url[len("attachment:"):], url)
        return super().image(text, url, title)


def quarto_md(src: str) -> str:
    "Drop the Quarto-only markdown syntax mistune does not know: link attributes `{...}`, `:::` div fences."
    src = re.sub(r"\[source\]\(([^)\s]+)\)\{[^}\n]*\}", r'<a class="source-link" href="\1">source</a>', src)
    src = re.sub(r"(\]\([^)\s]*\))\{[^}\n]*\}", r"\1", src)
    return re.sub(r"^:::.*$", "", src, flags=re.M)


# ---------------------------------------------------------------- pages
@dataclass
class Page:
    site: "Site"
    source: str           # notebook file name
    href: str             # output file name
    title: str
    description: str = ""
    number: str = ""
    nav: str = ""
    is_home: bool = False
    toc: list = field(default_factory=list)
    ids: dict = field(default_factory=dict)
    attachments: dict = field(default_factory=dict)
    in_toc: bool = True
    subtitle: str = ""

    def anchor(self, text: str) -> str:
        base = slug(text)
        n = self.ids.get(base, 0)
        self.ids[base] = n + 1
        return base if n == 0 else f"{base}-{n}"

    def inline(self, src: str) -> str:
        "One line of markdown (a subtitle) without its paragraph tags."
        return re.sub(r"^<p>|</p>\s*$", "", self.markdown(src, in_toc=False).strip())

    def markdown(self, src: str, in_toc=True) -> str:
        self.in_toc = in_toc
        md = mistune.create_markdown(renderer=Renderer(self), plugins=[
            "math", math_in_list, math_in_quote, "table", "strikethrough", "footnotes", "url"])
        return md(quarto_md(src))


def cell_options(src: str) -> tuple[dict, str]:
    "Quarto/nbdev `#| key: value` options of a code cell, and its source without them (cell magics kept)."
    opts, keep, lines = {}, [], src.splitlines()
    for i, line in enumerate(lines):
        m = DIRECTIVE.match(line)
        if m:
            k, _, v = m[1].partition(":") if ":" in m[1] else (m[1].split(" ")[0], "", "")
            opts[k.strip()] = v.strip().lower() or "true"
        elif line.startswith("%%") or not line.strip():
            keep.append(line)
        else:
            keep.extend(lines[i:])
            break
    return opts, "\n".join(keep).strip("\n")


def code_html(src: str, lang: str) -> str:
    "Code highlighted by Pygments (IPython's lexer for Python, so cell magics read right)."
    try: lexer = get_lexer_by_name("ipython3" if lang == "python" else lang)
    except ClassNotFound: lexer = get_lexer_by_name("text")
    return highlight(src, lexer, HtmlFormatter(cssclass="highlight"))


def text_of(v) -> str: return ANSI.sub("", "".join(v) if isinstance(v, list) else str(v))


def output_html(page: Page, out: dict, is_doc: bool) -> str:
    t = out.get("output_type")
    if t == "stream":
        cls = "stderr" if out.get("name") == "stderr" else "stdout"
        return f'<div class="output"><pre class="{cls}">{html.escape(text_of(out.get("text", "")))}</pre></div>'
    if t == "error":
        log(f"{page.source}: saved error output {out.get('ename')}: {out.get('evalue')}")
        tb = "\n".join(text_of(x) for x in out.get("traceback", [])) or f"{out.get('ename')}: {out.get('evalue')}"
        return f'<div class="output output-error"><pre>{html.escape(tb)}</pre></div>'
    data = out.get("data", {})
    if "text/html" in data:
        body = text_of(data["text/html"])
    elif "image/svg+xml" in data:
        body = text_of(data["image/svg+xml"])
    elif any(k in data for k in ("image/png", "image/jpeg", "image/gif")):
        k = next(k for k in ("image/png", "image/jpeg", "image/gif") if k in data)
        b64 = "".join(data[k]).replace("\n", "") if isinstance(data[k], list) else data[k].replace("\n", "")
        body = f'<img src="data:{k};base64,{b64}" alt="plot">'
    elif "text/markdown" in data:
        body = page.markdown(text_of(data["text/markdown"]), in_toc=is_doc)
        if is_doc: return f'<div class="doc">{body}</div>'
    elif "text/latex" in data:
        tex = text_of(data["text/latex"]).strip().strip("$")
        body = math_html(tex, True, page.source)
    elif "text/plain" in data:
        body = f'<pre>{html.escape(text_of(data["text/plain"]))}</pre>'
    else:
        return ""
    return f'<div class="output">{body}</div>'


def cell_html(page: Page, cell: dict, lang: str) -> str:
    src = text_of(cell.get("source", ""))
    if cell["cell_type"] == "markdown":
        page.attachments = {name: f"data:{k};base64,{v}" for name, d in (cell.get("attachments") or {}).items()
                            for k, v in list(d.items())[:1]}
        return page.markdown(src)
    if cell["cell_type"] == "raw":
        fmt = (cell.get("metadata") or {}).get("format", "") or (cell.get("metadata") or {}).get("raw_mimetype", "")
        return src if fmt in ("text/html", "html") else ""
    opts, code = cell_options(src)
    if opts.get("include") == "false": return ""
    parts = []
    if code and opts.get("echo") != "false":
        block = code_html(code, lang)
        fold = opts.get("code-fold")
        if fold in ("true", "show"):
            block = f'<details class="input"{" open" if fold == "show" else ""}><summary>Code</summary>{block}</details>'
        else:
            block = f'<div class="input">{block}</div>'
        parts.append(block)
    if opts.get("output") != "false" and opts.get("eval") != "false":
        is_doc = code.lstrip().startswith("show_doc(")
        parts += [output_html(page, o, is_doc) for o in cell.get("outputs", [])]
    parts = [p for p in parts if p]
    return f'<div class="cell">{"".join(parts)}</div>' if parts else ""


def frontmatter(nb: dict) -> dict:
    "nbdev puts the title, description and output-file into a leading raw `---` cell."
    for c in nb["cells"]:
        s = text_of(c.get("source", "")).strip()
        if c["cell_type"] == "raw" and s.startswith("---"):
            try: return yaml.safe_load(s.strip("-\n")) or {}
            except yaml.YAMLError: return {}
    return {}


class Site:
    def __init__(self, root: Path):
        cfg = configparser.ConfigParser()
        cfg.read(root / "settings.ini")
        d = cfg["DEFAULT"] if cfg.has_section("DEFAULT") or cfg.defaults() else {}
        self.title = d.get("title", root.name)
        self.description = d.get("description", "")
        self.nbs = root / d.get("nbs_path", "nbs")
        host, base = d.get("doc_host", "").rstrip("/"), d.get("doc_baseurl", "").strip("/")
        self.doc_prefix = f"{host}/{base}/" if base else f"{host}/"
        self.hrefs: dict[str, str] = {}  # notebook stem -> page file

    def fix_url(self, url: str) -> str:
        "Hosted-docs and notebook links -> local page files; everything else as it is."
        if self.doc_prefix != "/" and url.startswith(self.doc_prefix):
            url = url[len(self.doc_prefix):] or "index.html"
        m = re.match(r"^(?:\./)?([^/:#?]+)\.ipynb(#.*)?$", url)
        if m and m[1] in self.hrefs:
            url = self.hrefs[m[1]] + (m[2] or "")
        return url


def page_meta(site: Site, src: Path, nb: dict) -> Page:
    fm = frontmatter(nb)
    href = "index.html" if src.stem == "index" else fm.get("output-file") or f"{src.stem}.html"
    title = fm.get("title")
    if not title:
        h1 = next((m[1] for c in nb["cells"] if c["cell_type"] == "markdown"
                   for m in [re.search(r"^#\s+(.+)$", text_of(c["source"]), re.M)] if m), None)
        title = h1 or src.stem
    num = re.match(r"^(\d+[a-z]?)_", src.stem)
    p = Page(site, src.name, href, str(title), str(fm.get("description") or ""), num[1] if num else "",
             is_home=src.stem == "index")
    p.nav = "Home" if p.is_home else p.title
    p.subtitle = Markup(p.inline(p.description)) if p.description else ""
    p.description = re.sub(r"\$+", "", p.description)  # plain text for <meta>
    return p


def build(out: Path, jobs: int = os.cpu_count() or 1, timeout: float = 600) -> list[Path]:
    site = Site(ROOT)
    nbl = notebooks(site.nbs)
    if not nbl: raise SystemExit(f"build_site: no notebooks in {site.nbs}")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"build_site: {out} is not empty and was not built by this script; not overwriting it")
    with tempfile.TemporaryDirectory(prefix="jigsaw_site_proc_") as tmp:
        log(f"processing {len(nbl)} notebooks with nbdev ({jobs} at a time)")
        procd = process(nbl, Path(tmp), jobs, timeout)
        nbs = {src: json.loads(procd[src].read_text()) for src in nbl}
    pages = [page_meta(site, src, nbs[src]) for src in nbl]
    site.hrefs = {Path(p.source).stem: p.href for p in pages}

    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("built by tools/build_site.py; this folder is wiped on every build\n")
    css = (ASSETS / "style.css").read_text() + "\n/* pygments */\n" + HtmlFormatter().get_style_defs(".highlight")
    (out / "style.css").write_text(css)
    for f in site.nbs.rglob("*"):  # images the markdown refers to by relative path
        rel = f.relative_to(site.nbs)
        if f.suffix.lower() in IMAGE_EXTS and f.is_file() and not any(x.startswith((".", "_")) for x in rel.parts):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out / rel)

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ASSETS), autoescape=jinja2.select_autoescape(["html"]))
    tpl = env.get_template("page.html")
    nav = [{"href": p.href, "title": p.nav, "number": p.number} for p in pages]
    written = []
    for i, (src, page) in enumerate(zip(nbl, pages)):
        nb = nbs[src]
        lang = ((nb.get("metadata") or {}).get("kernelspec") or {}).get("language", "python")
        body = "\n".join(h for c in nb["cells"] for h in [cell_html(page, c, lang)] if h)
        prev = nav[i - 1] if i > 0 else None
        nxt = nav[i + 1] if i + 1 < len(nav) else None
        doc = tpl.render(page=page, pages=nav, body=Markup(body),
                         prev=prev, next=nxt, toc=page.toc, site_title=site.title, site_description=site.description)
        (out / page.href).write_text(doc)
        written.append(out / page.href)
        log(f"{src.name} -> {page.href}")
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_site"), help="output folder (default: _site in the repository)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="notebooks processed at once")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed to process one notebook")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    written = build(out, a.jobs, a.timeout)
    print(f"wrote {len(written)} pages to {out}; open {out / 'index.html'}")


if __name__ == "__main__":
    main()
