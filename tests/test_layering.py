"""The house, read from the imports of jigsaw_ref/*.py (static: every `import` and `from ... import` anywhere in a
module, function bodies included): no import cycle, nothing imports `train` but the command line (`cli`),
and the layering that index.ipynb states holds."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "jigsaw_ref"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_"))


def imports(mod: str) -> set[str]:
    "The jigsaw_ref modules that `mod` imports, anywhere in its source."
    tree, out = ast.parse((PKG / f"{mod}.py").read_text()), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level == 1: name = "jigsaw_ref." + name if name else "jigsaw_ref"
            if name == "jigsaw_ref": out |= {a.name for a in node.names if a.name in MODULES}
            elif name.startswith("jigsaw_ref."): out.add(name.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jigsaw_ref.")}
    return out - {mod}


GRAPH = {m: imports(m) for m in MODULES}


def _closure(m, seen=None):
    seen = set() if seen is None else seen
    for n in GRAPH.get(m, ()):
        if n not in seen: seen.add(n); _closure(n, seen)
    return seen


def test_no_import_cycle():
    cycles = [m for m in MODULES if m in _closure(m)]
    assert not cycles, {m: sorted(GRAPH[m]) for m in cycles}


def test_nothing_imports_train():
    "The trainer is composed only by the command line (`cli`: jigsaw-train, jigsaw-demo); no other module imports it."
    users = [m for m in MODULES if "train" in GRAPH[m] and m != "cli"]
    assert not users, {m: sorted(GRAPH[m]) for m in users}
    assert not [m for m in MODULES if "cli" in GRAPH[m]], "nothing imports the command line"


def test_the_trainer_rooms():
    "settings (what a run is) and runfolder (where it writes) sit below the trainer and know nothing of models or data."
    assert not (_closure("settings") & {"mixer", "parallel", "pmatmul", "data", "checkpoint", "train", "runfolder"}), sorted(_closure("settings"))
    assert not (_closure("runfolder") & {"mixer", "parallel", "pmatmul", "data", "train"}), sorted(_closure("runfolder"))


@pytest.mark.parametrize("mod", ["config", "mixer", "loss"])
def test_one_process_model_imports_no_communication(mod):
    "The one-process model (config, mixer, loss) is the reference: it reads on its own."
    assert not (_closure(mod) & {"comm", "grid", "ranks", "probe", "pmatmul", "parallel"}), sorted(_closure(mod))


def test_communication_knows_grids_and_tensors_never_models_or_data():
    for mod in ("comm", "grid", "ranks", "probe"):
        assert not (_closure(mod) & {"mixer", "parallel", "pmatmul", "data", "generator", "train", "evaluate"}), (mod, sorted(_closure(mod)))


def test_data_knows_layouts_never_models():
    assert not (_closure("data") & {"mixer", "parallel", "pmatmul", "train", "generator"}), sorted(_closure("data"))


def test_nothing_imports_the_composers():
    "train, evaluate, forecast and bench compose everything; nothing below them imports them (evaluate only from the command line's demo and forecast)."
    for top, allowed in (("bench", ()), ("evaluate", ("cli", "forecast")), ("forecast", ())):
        users = [m for m in MODULES if top in GRAPH[m] and m not in allowed]
        assert not users, (top, users)


def test_plan_knows_models_and_the_performance_model_never_trainers_or_data():
    "plan is imported by train (its memory check): it may use the model, the layout and perfmodel, nothing above them."
    assert not (_closure("plan") & {"train", "bench", "evaluate", "data", "checkpoint", "generator"}), sorted(_closure("plan"))


def test_every_module_is_covered():
    assert {"config", "mixer", "loss", "grid", "comm", "ranks", "probe", "pmatmul", "parallel"} <= set(MODULES)
