"""The package's architecture, checked: every module imports on its own, the import graph has no cycle,
and every import points down the layers below (the one place the layer order is written down; README's
"Layout" and CONTRIBUTING describe it in words)."""
import ast
import importlib.util
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import reta_fast

# Bottom to top. A module may import modules of a lower layer, and modules of its own subpackage (without
# cycles); never a module of a higher layer, nor a sibling package of its own layer.
LAYERS = [
    ["reta_fast._version", "reta_fast._ext", "reta_fast._validate", "reta_fast.fileio", "reta_fast.kernels"],
    ["reta_fast.topology", "reta_fast.data", "reta_fast.models"],
    ["reta_fast.retrieval", "reta_fast.train"],
    ["reta_fast.recover"],
    ["reta_fast.stages"],
    ["reta_fast.cli"],
    ["reta_fast", "reta_fast.pipeline"],  # the package root and its deprecated alias
]
# Imports inside functions are for optional dependencies only; within the package, that is the Triton
# kernels (they need triton) and the compiled extension.
OPTIONAL_INTERNAL = {"reta_fast.kernels", "reta_fast._C"}

PKG_DIR = Path(reta_fast.__file__).parent
KERNEL_DIR = Path(importlib.util.find_spec("reta_fast.kernels").submodule_search_locations[0])  # without triton too


def _modules():
    mods = {}
    for root, prefix in ((PKG_DIR, "reta_fast"), (KERNEL_DIR, "reta_fast.kernels")):
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if prefix == "reta_fast" and parts and parts[0] == "kernels":
                continue
            name = ".".join([prefix, *parts])
            mods[name] = (f, f.name == "__init__.py")
    return mods


MODULES = _modules()


def _owner(name: str):
    """The entry of LAYERS a module belongs to (longest prefix)."""
    best = None
    for layer, group in enumerate(LAYERS):
        for p in group:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (layer, p)
    return best


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom):
    base = mod if is_pkg else mod.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    target = ".".join(p for p in (base, node.module) if p) if node.level else node.module
    out = []
    for alias in node.names:
        full = f"{target}.{alias.name}"
        out.append(full if full in MODULES or full == "reta_fast._C" else target)
    return out


def _imports(name):
    """``[(imported module, line, inside a function)]`` of the package's own modules."""
    path, is_pkg = MODULES[name]
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                for t in _resolve(name, is_pkg, child):
                    if t and t.startswith("reta_fast"):
                        found.append((t, child.lineno, f))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("reta_fast"):
                        found.append((a.name, child.lineno, f))
            visit(child, f)

    visit(tree, False)
    return found


def _known(t):
    while t and t not in MODULES and t != "reta_fast._C":
        t = t.rpartition(".")[0]
    return t


GRAPH = {m: sorted({_known(t) for t, _, f in _imports(m) if _known(t) and not f and _known(t) != m}) for m in MODULES}


def test_every_module_is_placed_in_a_layer():
    assert not [m for m in MODULES if _owner(m) is None], "add new top-level modules to LAYERS"


def test_imports_point_down_the_layers():
    bad = []
    for m in MODULES:
        lm, gm = _owner(m)
        for t, line, in_func in _imports(m):
            t = _known(t)
            if t == "reta_fast._C" or t == m:
                continue
            lt, gt = _owner(t)
            same_package = gt == gm
            if not (lt < lm or same_package):
                bad.append(f"{m}:{line} imports {t} (layer {lt} {gt} from layer {lm} {gm})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_function_level_imports_only_for_optional_dependencies():
    bad = [f"{m}:{line} imports {t} inside a function" for m in MODULES for t, line, f in _imports(m)
           if f and not any(t == o or t.startswith(o + ".") for o in OPTIONAL_INTERNAL)]
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    state, stack, cycles = {}, [], []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for t in GRAPH.get(m, []):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t in GRAPH and not state.get(t):
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in GRAPH:
        if not state.get(m):
            dfs(m)
    # a package's __init__ re-exporting its submodules is not a cycle unless a submodule imports the package
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _import_alone(name):
    r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300,
                       cwd=tempfile.gettempdir())
    return name, r.returncode, r.stderr[-2000:]


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    names = [m for m in MODULES if m != "reta_fast.cli.__main__"]
    with ThreadPoolExecutor(max_workers=2) as ex:
        failed = [(n, err) for n, rc, err in ex.map(_import_alone, names) if rc != 0]
    assert not failed, "\n\n".join(f"{n}:\n{err}" for n, err in failed)
