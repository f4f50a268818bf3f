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
4. `show_doc` of a class reads `class Name(...)`, followed by its public methods and properties (signature and
   docstring, from the installed module by `inspect`) unless the page documents them itself.
5. "source" links go to a highlighted copy of the module shipped in the site (`src/<lib>/<module>.py.html`),
   never to the repository (settings.ini's `git_url`); `%%px` cells keep their magic line and a badge saying
   they run on the MPI engines.
6. A search box on every page: an index of every page's sections written at build time (`search_index.js`)
   and a small static script (`search.js`); nothing is fetched, it works from file://. `page.html?q=words`
   opens a page with the results of `words` shown.
"""
from __future__ import annotations

import argparse, ast, configparser, contextlib, html, importlib, inspect, json, os, re, shutil, subprocess, sys, tempfile, unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
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

# nbdev's processing of one notebook, what `nbdev_proc_nbs` does per file (nbdev.serve_drv.main), in a subprocess
PROC = "import sys; sys.path.insert(0, sys.argv[3]); import build_site; build_site.nbdev_process(sys.argv[1], sys.argv[2])"
PX = re.compile(r"^\s*%%px\b")
OTHER_MAGICS = re.compile(r"^\s*(%%|%)(?!%?px\b|autopx\b).*", re.M)


def log(*a): print("build_site:", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- notebooks -> processed notebooks
def notebooks(nbs: Path) -> list[Path]:
    "Every `nbs/*.ipynb` not starting with `_` or `.`, index first, then in file-name (notebook) order."
    nbl = sorted(p for p in nbs.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    return sorted(nbl, key=lambda p: p.stem != "index")


def keep_px_magics(cell):
    "nbdev's `clean_magics`, except that ipyparallel's `%%px`/`%px` lines stay: they say where the code runs."
    if cell.cell_type == "code": cell.source = OTHER_MAGICS.sub("", cell.source).strip()


def nbdev_process(src: str, dst: str):
    "nbdev's `FilterDefaults` processors on notebook `src`, written to `dst`; `clean_magics` keeps `%%px` lines."
    from nbdev.processors import FilterDefaults, clean_magics
    from nbdev.serve_drv import main

    class Procs(FilterDefaults):
        def base_procs(self): return [keep_px_magics if f is clean_magics else f for f in super().base_procs()]
    main((Path(src), Path(dst), Procs))


def process(nbl: list[Path], dest: Path, jobs: int, timeout: float) -> dict[Path, Path]:
    "Run nbdev's processors on each notebook in its own subprocess (cwd = the notebook's folder)."
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}

    def one(src: Path):
        dst = dest / src.name
        try:
            r = subprocess.run([sys.executable, "-c", PROC, str(src), str(dst), str(ASSETS.parent)], cwd=src.parent, env=env,
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


def quarto_md(src: str, source_href=lambda url: None) -> str:
    """Drop the Quarto-only markdown syntax mistune does not know: link attributes `{...}`, `:::` div fences.
    nbdev's `[source](repository URL)` links become `source_href(url)` (a page of the site), or nothing."""
    def source(m):
        href = source_href(m[1])
        return f'<a class="source-link" href="{html.escape(href)}">source</a>' if href else ""
    src = re.sub(r"\[source\]\(([^)\s]+)\)(\{[^}\n]*\})?", source, src)
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
    module: str = ""      # the notebook's `#| default_exp` module, as `lib.name`
    documented: set = field(default_factory=set)  # names the page's own `show_doc` cells document
    shown: set = field(default_factory=set)       # names documented so far while rendering
    target: str = ""      # the name the show_doc entry being rendered documents (for its source link's line)

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
        return md(quarto_md(src, self.source_href))

    def source_href(self, url: str) -> str | None:
        "A show_doc entry's source link: from the documented object itself when it resolves, else from nbdev's URL."
        obj = self.site.resolve(self.target, self.module) if self.target else None
        href = self.site.local_source(obj, self.target) if obj is not None and not inspect.ismodule(obj) else None
        return href or self.site.source_href(url, self.target)


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


IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def image_html(data: dict, meta: dict) -> str:
    "An embedded image output; the width/height IPython saved (`Image(width=)`, retina plots) become attributes."
    k = next(k for k in IMAGE_TYPES if k in data)
    b64 = "".join(data[k]).replace("\n", "") if isinstance(data[k], list) else data[k].replace("\n", "")
    size = "".join(f' {a}="{int(v)}"' for a in ("width", "height")
                   for v in [((meta or {}).get(k) or {}).get(a)] if isinstance(v, (int, float)))
    return f'<img class="output-image" src="data:{k};base64,{b64}"{size} alt="figure">'


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
    elif any(k in data for k in IMAGE_TYPES):
        body = image_html(data, out.get("metadata") or {})
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


# ---------------------------------------------------------------- classes and their methods
SHOW_DOC = re.compile(r"^\s*show_doc\(\s*([A-Za-z_][\w.]*)")


def doc_target(code: str) -> str | None:
    "`Trainer.fit` for a cell `show_doc(Trainer.fit)`."
    m = SHOW_DOC.match(code)
    return m[1] if m else None


def public_name(cls: type) -> str:
    "`torch.nn.Module` for `torch.nn.modules.module.Module`: the shortest parent module that exports the class."
    if cls.__module__ == "builtins": return cls.__qualname__
    parts = cls.__module__.split(".")
    for k in range(1, len(parts) + 1):
        mod = sys.modules.get(".".join(parts[:k]))
        if mod is not None and getattr(mod, cls.__qualname__, None) is cls: return f"{'.'.join(parts[:k])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def class_md(md: str, cls: type) -> str:
    "show_doc's markdown for a class: `class Name(params)` instead of `def Name(params)->None:`, and its bases."
    bases = [b for b in cls.__bases__ if b is not object]
    shown = []  # whether the bases are in the class line already

    def sig(m):
        params = m[2]
        if not params.strip() or re.fullmatch(r"\s*\*args,\s*\*\*kwargs\s*", params):  # no __init__ of its own
            shown.append(True)
            return f"```python\nclass {m[1]}" + (f"({', '.join(b.__name__ for b in bases)})" if bases else "") + "\n```"
        return f"```python\nclass {m[1]}({params})\n```"
    md = re.sub(r"```python\ndef ([\w.]+)\((.*?)\)\s*(?:->\s*None)?:\n```", sig, md, count=1, flags=re.S)
    if bases and not shown:
        lib = cls.__module__.split(".")[0]
        names = ", ".join(f"`{b.__name__}`" if b.__module__.split(".")[0] == lib else f"`{public_name(b)}`" for b in bases)
        md += f"\n\nBases: {names}"
    return md


def members(cls: type, documented: set, lib: str) -> list:
    "Public methods and properties `cls` defines itself (`@patch`ed ones too), in order, unless documented elsewhere."
    out = []
    for k, v in vars(cls).items():
        if k.startswith("_"): continue
        kind = ("property" if isinstance(v, property) else "staticmethod" if isinstance(v, staticmethod)
                else "classmethod" if isinstance(v, classmethod) else "method" if inspect.isfunction(v) else None)
        fn = None if kind is None else v.fget if kind == "property" else getattr(v, "__func__", v)
        if fn is None or not str(getattr(fn, "__module__", "")).split(".")[0] == lib: continue
        if f"{cls.__qualname__}.{k}" in documented: continue
        out.append((k, kind, fn))
    return out


def member_md(cls: type, name: str, kind: str, fn) -> str:
    "A method's or property's doc entry: heading `Class.name`, signature (with docments), docstring."
    from fastcore.docments import DocmentText
    if kind == "property":
        try: ret = inspect.signature(fn).return_annotation
        except (TypeError, ValueError): ret = inspect.Signature.empty
        ann = "" if ret is inspect.Signature.empty else f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
        code = f"@property\ndef {name}(self){ann}"
    else:
        try: code = str(DocmentText(fn, maxline=110, docstring=False))
        except Exception: code = f"def {name}{inspect.signature(fn)}:"
        code = re.sub(r"^def [^(\s]+\(", f"def {name}(", code)
        if kind != "method": code = f"@{kind}\n{code}"
    doc = inspect.cleandoc(fn.__doc__ or "")  # not inspect.getdoc: it would borrow a base class's docstring
    md = f"#### {cls.__qualname__}.{name}\n\n```python\n{code}\n```\n"
    return md + ("\n" + re.sub(r"^(\s*)(.+)", r"\1*\2*", doc, count=1) + "\n" if doc else "")


def doc_html(page: Page, md: str, target: str | None) -> str:
    "A show_doc entry; a class gets `class` and its public members' entries beneath it."
    if target and "." in target:  # `show_doc(Trainer.validate)` of a wrapped method is titled `validate`: say whose
        md = re.sub(rf"^(#+) {re.escape(target.rsplit('.', 1)[1])}\s*$", rf"\1 {target}", md, count=1, flags=re.M)
    obj = page.site.resolve(target, page.module) if target else None
    page.target = target or ""
    try:
        if not inspect.isclass(obj):
            return f'<div class="doc">{page.markdown(md)}</div>'
        parts = [f'<div class="doc doc-class">{page.markdown(class_md(md, obj))}</div>']
    finally:
        page.target = ""
    for name, kind, fn in members(obj, page.documented, page.site.lib):
        src = page.site.local_source(fn, f"{obj.__qualname__}.{name}")
        link = f'<a class="source-link" href="{html.escape(src)}">source</a>\n\n' if src else ""
        body = page.markdown(link + page.site.linkify(member_md(obj, name, kind, fn)), in_toc=False)
        parts.append(f'<div class="doc doc-member">{body}</div>')
    return "".join(parts)


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
    parts, px = [], bool(PX.match(code))
    if px:
        parts.append('<div class="px-badge" title="an ipyparallel %%px cell: it runs on every engine (MPI rank), '
                     'not in the notebook kernel">runs on every MPI engine</div>')
    if code and opts.get("echo") != "false":
        block = code_html(code, lang)
        if px:  # IPython's lexer reads a cell magic's body as plain text: highlight the Python under the magic line
            magic, _, rest = code.partition("\n")
            block = code_html(rest or " ", lang).replace(
                "<pre><span></span>", f'<pre><span></span><span class="px-magic">{html.escape(magic)}</span>\n', 1)
        fold = opts.get("code-fold")
        if fold in ("true", "show"):
            block = f'<details class="input"{" open" if fold == "show" else ""}><summary>Code</summary>{block}</details>'
        else:
            block = f'<div class="input">{block}</div>'
        parts.append(block)
    if opts.get("output") != "false" and opts.get("eval") != "false":
        target = doc_target(code)
        if target and target in page.shown:  # nbdev adds `show_doc(C.m)` for a `@patch`ed method even if the page has one
            return ""
        if target: page.shown.add(target)
        for o in cell.get("outputs", []):
            md = (o.get("data") or {}).get("text/markdown")
            if target and md is not None:
                parts.append(doc_html(page, text_of(md), target))
            else:
                parts.append(output_html(page, o, bool(target)))
    parts = [p for p in parts if p]
    if not parts or (px and len(parts) == 1): return ""
    return f'<div class="cell{" cell-px" if px else ""}">{"".join(parts)}</div>'


def frontmatter(nb: dict) -> dict:
    "nbdev puts the title, description and output-file into a leading raw `---` cell."
    for c in nb["cells"]:
        s = text_of(c.get("source", "")).strip()
        if c["cell_type"] == "raw" and s.startswith("---"):
            try: return yaml.safe_load(s.strip("-\n")) or {}
            except yaml.YAMLError: return {}
    return {}


def default_exp(nb: dict) -> str:
    "The module a notebook exports to (`#| default_exp name`), or ''."
    for c in nb["cells"]:
        m = re.search(r"^\s*#\|\s*default_exp\s+(\S+)", text_of(c.get("source", "")), re.M)
        if c["cell_type"] == "code" and m: return m[1]
    return ""


@contextlib.contextmanager
def in_dir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try: yield
    finally: os.chdir(old)


class Site:
    def __init__(self, root: Path):
        cfg = configparser.ConfigParser()
        cfg.read(root / "settings.ini")
        d = cfg["DEFAULT"] if cfg.has_section("DEFAULT") or cfg.defaults() else {}
        self.root = root
        self.title = d.get("title", root.name)
        self.description = d.get("description", "")
        self.nbs = root / d.get("nbs_path", "nbs")
        self.lib = d.get("lib_path", d.get("lib_name", root.name)).strip("/")
        host, base = d.get("doc_host", "").rstrip("/"), d.get("doc_baseurl", "").strip("/")
        self.doc_prefix = f"{host}/{base}/" if base else f"{host}/"
        self.hrefs: dict[str, str] = {}    # notebook stem -> page file
        self.sources: dict[str, str] = {}  # module file (`lib/x.py`) -> its highlighted copy in the site
        self.lines: dict[str, dict] = {}   # module file -> {name: line} in that copy (`Class.method` too)
        self._lookup, self._unimportable = None, set()

    def fix_url(self, url: str) -> str:
        "Hosted-docs and notebook links -> local page files; everything else as it is."
        if self.doc_prefix != "/" and url.startswith(self.doc_prefix):
            url = url[len(self.doc_prefix):] or "index.html"
        m = re.match(r"^(?:\./)?([^/:#?]+)\.ipynb(#.*)?$", url)
        if m and m[1] in self.hrefs:
            url = self.hrefs[m[1]] + (m[2] or "")
        return url

    def source_href(self, url: str, name: str = "") -> str | None:
        """nbdev's repository link `git_url/blob/BRANCH/lib/x.py#L12` for `name` -> the site's copy of `lib/x.py`,
        at `name`'s line in that copy (nbdev's number, read from the file later, may be off if it changed since)."""
        m = re.match(r"^(?:https?://[^/]+/[^/]+/[^/]+)/(?:blob|tree)/[^/]+/([^#?]+)(?:#L(\d+))?", url)
        if not m or m[1] not in self.sources: return None
        line = self.lines[m[1]].get(name)
        return self.sources[m[1]] + (f"#L-{line}" if line else "")

    def local_source(self, obj, name: str) -> str | None:
        """The site's copy of the file `obj` is defined in, at its definition: the line of its own qualified name
        (`Class.method`, a `@patch`ed `Class.method`, a function assigned as a method), else the line of `name`."""
        obj = inspect.unwrap(obj)
        try: rel = Path(inspect.getsourcefile(obj)).resolve().relative_to(self.root.resolve()).as_posix()
        except (TypeError, OSError, ValueError): return None
        if rel not in self.sources: return None
        qual = getattr(obj, "__qualname__", "")
        line = self.lines[rel].get(qual if "<" not in qual else "") or self.lines[rel].get(name)
        return self.sources[rel] + (f"#L-{line}" if line else "")

    def resolve(self, dotted: str, module: str = ""):
        "The object `dotted` (e.g. `Trainer.fit`) names in `module`, else in any module of the library, or None."
        mods = [module] if module else []
        mods += [f"{self.lib}.{p.stem}" for p in sorted((self.root / self.lib).glob("*.py")) if not p.stem.startswith("_")]
        for mod in dict.fromkeys(mods):
            if mod in self._unimportable: continue
            try:
                with in_dir(self.root): obj = importlib.import_module(mod)
            except Exception as e:
                log(f"cannot import {mod} to document its classes: {type(e).__name__}: {e}")
                self._unimportable.add(mod)
                continue
            for part in dotted.split("."):
                obj = getattr(obj, part, None)
                if obj is None: break
            else:
                return obj
        return None

    def linkify(self, md: str) -> str:
        "nbdev's doc links (what its `add_links` processor does) for markdown this script writes."
        try:
            if self._lookup is None:
                from nbdev.doclinks import NbdevLookup
                with in_dir(self.root): self._lookup = NbdevLookup()
            return self._lookup.linkify(md)
        except Exception as e:
            log(f"doc links not added: {type(e).__name__}: {e}")
            return md


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
    p.documented = {t for c in nb["cells"] if c["cell_type"] == "code"
                    for t in [doc_target(cell_options(text_of(c.get("source", "")))[1])] if t}
    return p


# ---------------------------------------------------------------- module sources shipped in the site
def lib_sources(site: Site) -> dict[str, str]:
    "`lib/x.py` -> its text, for every module file of the library."
    return {f.relative_to(site.root).as_posix(): f.read_text()
            for f in sorted((site.root / site.lib).rglob("*.py")) if "__pycache__" not in f.parts}


def def_lines(text: str) -> dict[str, int]:
    "{name: line} of a module's functions and classes, `Class.method` for methods and `@patch`ed functions."
    from nbdev.doclinks import patch_name
    try: tree = ast.parse(text)
    except SyntaxError: return {}
    d = {}
    for t in tree.body:
        if isinstance(t, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = patch_name(t)
            for n in ([names] if isinstance(names, str) else names): d[n] = t.lineno
        if isinstance(t, ast.ClassDef):
            for t2 in t.body:
                if isinstance(t2, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): d[f"{t.name}.{t2.name}"] = t2.lineno
                for n in assigned(t2): d.setdefault(f"{t.name}.{n}", t2.lineno)
        for n in assigned(t):  # `Class.name = function` after the class
            if "." in n: d.setdefault(n, t.lineno)
    return d


def assigned(t) -> list[str]:
    "Names (`x`, `Class.x`) an assignment statement binds."
    targets = t.targets if isinstance(t, ast.Assign) else [t.target] if isinstance(t, ast.AnnAssign) else []
    out = []
    for x in targets:
        for e in (x.elts if isinstance(x, ast.Tuple) else [x]):
            if isinstance(e, ast.Name): out.append(e.id)
            elif isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name): out.append(f"{e.value.id}.{e.attr}")
    return out


def write_sources(site: Site, out: Path, env: jinja2.Environment, texts: dict[str, str]) -> dict[str, str]:
    "Each module file `lib/x.py` (`texts`: read when the build started) as `src/lib/x.py.html`, line `n` at `L-n`."
    tpl, done = env.get_template("source.html"), {}
    lexer = get_lexer_by_name("python3")
    for rel, text in texts.items():
        href = f"src/{rel}.html"
        nb = re.search(r"File to edit: (?:\.\./)*(?:nbs/)?([^\s/]+)\.ipynb", text[:500])
        doc = site.hrefs.get(nb[1]) if nb else None
        code = highlight(text, lexer, HtmlFormatter(cssclass="highlight source", linenos="inline", linespans="L"))
        up = "../" * href.count("/")
        dest = out / href
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(tpl.render(root=up, path=rel, code=Markup(code), doc=(up + doc) if doc else None,
                                   notebook=f"{nb[1]}.ipynb" if nb else None, site_title=site.title))
        done[rel] = href
        site.lines[rel] = def_lines(text)
    return done


# ---------------------------------------------------------------- search index
class Sections(HTMLParser):
    "A page body cut at its headings that have an id: [(id, heading text, text)]; math, scripts, 'source' left out."
    SKIP = {"script", "style", "math"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.heading, self.skip, self.in_source = [["", [], []]], None, 0, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in self.SKIP: self.skip += 1
        elif tag == "a" and "source-link" in (a.get("class") or ""): self.in_source = True
        elif re.fullmatch(r"h[1-6]", tag) and a.get("id"):
            self.out.append([a["id"], [], []])
            self.heading = tag

    def handle_endtag(self, tag):
        if tag in self.SKIP: self.skip = max(0, self.skip - 1)
        elif tag == "a": self.in_source = False
        elif tag == self.heading: self.heading = None

    def handle_data(self, data):
        if self.skip or self.in_source: return
        self.out[-1][1 if self.heading else 2].append(data)

    def sections(self):
        clean = lambda xs: re.sub(r"\s+", " ", "".join(xs)).strip()
        return [(i, clean(h), clean(t)) for i, h, t in self.out if clean(h) or clean(t)]


SECTION_CHARS = 6000  # text kept per section in the index (the rest is mostly numbers in outputs)


def search_index(pages: list, bodies: list) -> dict:
    "{pages: [[href, title]], entries: [[page, anchor, heading, text]]}: what `search.js` searches."
    entries = []
    for k, (page, body) in enumerate(zip(pages, bodies)):
        p = Sections()
        p.feed(body)
        p.close()
        for anchor, heading, text in p.sections():
            entries.append([k, anchor, heading or page.title, text[:SECTION_CHARS]])
    return {"pages": [[p.href, p.title] for p in pages], "entries": entries}


def prune_links(body: str, page: Page, ids: dict) -> str:
    "Links to an anchor a page of the site lacks (nbdev links every indexed name, private ones too) become text."
    def sub(m):
        href, anchor = (m[1] or page.href).removeprefix("./"), m[2]
        if href not in ids or anchor in ids[href]: return m[0]
        log(f"{page.source}: no anchor {href}#{anchor}; link to it removed")
        return m[3]
    return re.sub(r'<a href="((?:\./)?[^"#:/]*\.html)?#([^"]+)"[^>]*>(.*?)</a>', sub, body, flags=re.S)


def build(out: Path, jobs: int = os.cpu_count() or 1, timeout: float = 600) -> list[Path]:
    site = Site(ROOT)
    nbl = notebooks(site.nbs)
    if not nbl: raise SystemExit(f"build_site: no notebooks in {site.nbs}")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"build_site: {out} is not empty and was not built by this script; not overwriting it")
    texts = lib_sources(site)  # the module copies shipped must be what nbdev's source line numbers were taken from
    with tempfile.TemporaryDirectory(prefix="jigsaw_site_proc_") as tmp:
        log(f"processing {len(nbl)} notebooks with nbdev ({jobs} at a time)")
        procd = process(nbl, Path(tmp), jobs, timeout)
        nbs = {src: json.loads(procd[src].read_text()) for src in nbl}
    pages = [page_meta(site, src, nbs[src]) for src in nbl]
    site.hrefs = {Path(p.source).stem: p.href for p in pages}
    for src, p in zip(nbl, pages):
        mod = default_exp(json.loads(src.read_text()))
        p.module = f"{site.lib}.{mod}" if mod else ""

    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("built by tools/build_site.py; this folder is wiped on every build\n")
    css = (ASSETS / "style.css").read_text() + "\n/* pygments */\n" + HtmlFormatter().get_style_defs(".highlight")
    (out / "style.css").write_text(css)
    shutil.copy2(ASSETS / "search.js", out / "search.js")
    for f in site.nbs.rglob("*"):  # images the markdown refers to by relative path
        rel = f.relative_to(site.nbs)
        if f.suffix.lower() in IMAGE_EXTS and f.is_file() and not any(x.startswith((".", "_")) for x in rel.parts):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out / rel)

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ASSETS), autoescape=jinja2.select_autoescape(["html"]))
    site.sources = write_sources(site, out, env, texts)
    tpl = env.get_template("page.html")
    nav = [{"href": p.href, "title": p.nav, "number": p.number} for p in pages]
    bodies = []
    for src, page in zip(nbl, pages):
        nb = nbs[src]
        lang = ((nb.get("metadata") or {}).get("kernelspec") or {}).get("language", "python")
        bodies.append("\n".join(h for c in nb["cells"] for h in [cell_html(page, c, lang)] if h))
    ids = {p.href: set(re.findall(r'\bid="([^"]+)"', b)) for p, b in zip(pages, bodies)}
    written = []
    for i, (src, page) in enumerate(zip(nbl, pages)):
        bodies[i] = body = prune_links(bodies[i], page, ids)
        prev = nav[i - 1] if i > 0 else None
        nxt = nav[i + 1] if i + 1 < len(nav) else None
        doc = tpl.render(page=page, pages=nav, body=Markup(body), root="",
                         prev=prev, next=nxt, toc=page.toc, site_title=site.title, site_description=site.description)
        (out / page.href).write_text(doc)
        written.append(out / page.href)
        log(f"{src.name} -> {page.href}")
    index = json.dumps(search_index(pages, bodies), ensure_ascii=False, separators=(",", ":"))
    (out / "search_index.js").write_text(f"window.JIGSAW_SEARCH = {index};\n")  # a script, not JSON: file:// has no fetch
    changed = [rel for rel, text in lib_sources(site).items() if texts.get(rel) != text]
    if changed:
        log(f"warning: {', '.join(changed)} changed during the build: source links and class members may not match; "
            "build again")
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
