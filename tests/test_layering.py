"""Imports inside progan_fast point down: no cycle, no upward import, every module placed.

The checker parses every module of the package with ``ast`` -- module-level, function-level and
``if TYPE_CHECKING`` imports alike, absolute and relative -- and builds the import graph between
the package's own modules. :data:`LAYERS` is the architecture, top first: a module may import
modules of the layers below its own, never above, and not its own layer's, except in a peer
layer (the op modules), where imports are allowed as long as they form no cycle and use only
public names. A new module fails the test until it is placed in a layer.

The tests at the end build small fake packages to show that the checker reports each kind of
violation (so the test of the real package cannot pass by checking nothing).
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import pytest

import progan_fast

PACKAGE_DIR = Path(progan_fast.__file__).resolve().parent

OPS = ("conv_act", "pixel_norm", "minibatch_stddev", "fade_in", "blend", "downsample2x")
#: The op modules: one per op, each with its reference, registration, autograd and backend table.
OP_MODULES = tuple(f"ops.{op}" for op in OPS)
#: The Triton kernels and launch wrappers of each op.
TRITON_OP_MODULES = tuple(f"ops.triton.{op}" for op in OPS)


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]  # fnmatch patterns of module names without the package prefix; "__init__" is the package
    peers: bool = False  # its modules may import each other (acyclic, public names only)


#: The layers of progan_fast, top first. Names are relative to the package.
LAYERS = (
    Layer("command lines", ("train", "bench", "generate", "export", "metrics", "dataset", "ops.kernel_report",
                            "ops.native_status")),
    Layer("training loop", ("trainer",)),
    Layer("starting from another run", ("init_from",)),
    Layer("run folder, run log, reading runs", ("run_folder", "run_log", "inference")),
    Layer("run settings", ("config",)),
    Layer("CUDA graphs", ("graphs",)),
    Layer("the step check of auto and --channels-last auto", ("step_choice",)),
    Layer("training step", ("step",)),
    Layer("training state", ("gan_state",)),
    Layer("networks and losses", ("networks", "losses")),
    Layer("ops API", ("ops",)),
    Layer("op modules", OP_MODULES, peers=True),
    Layer("Triton kernels of an op", TRITON_OP_MODULES),
    Layer("shared Triton kernels", ("ops.triton.elementwise",)),
    Layer("shared op references", ("ops.common",)),
    Layer("backend choice", ("ops._backend",)),
    Layer("auto's measured choice", ("ops.autotune",)),
    Layer("auto's choice cache", ("ops.autotune_cache",)),
    Layer("op support", ("ops.triton", "ops._amp", "ops._native")),
    Layer("command-line errors", ("cli",)),
    Layer("image folders", ("image_folder",)),
    Layer("dataset labels and pyramid files", ("labels", "pyramid_file")),
    Layer("leaves", ("__init__", "data", "schedule", "checkpoint", "images", "profiling", "distributed", "swd", "fid",
                     "augment")),
    Layer("atomic file writes", ("files",)),
)

#: Imported names that are not Python modules of the package.
EXTERNAL = {"progan_fast._C"}  # the native library built from kernels/


# --------------------------------------------------------------------------- the checker


def module_names(package_dir: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the package (``__init__.py`` is the package)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join([package, *parts])] = path
    return names


def _base_package(module: str, path: Path, level: int) -> str:
    """The package a ``from`` import with ``level`` leading dots is relative to."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return package


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    names: tuple[str, ...] = ()  # what a ``from imported import ...`` takes from it


def imports_of(module: str, path: Path, modules: dict[str, Path], package: str) -> list[Import]:
    """Every import of another package module in ``module``'s source, wherever it appears."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    target = alias.name
                    while target not in modules and "." in target:  # import a.b.c: the deepest module
                        target = target.rpartition(".")[0]
                    if alias.name not in EXTERNAL and target in modules:
                        found.append(Import(module, target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _base_package(module, path, node.level)
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source != package and not source.startswith(package + "."):
                continue
            from_source = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in EXTERNAL:
                    continue
                if submodule in modules:  # from package import submodule
                    found.append(Import(module, submodule, node.lineno))
                else:
                    from_source.append(alias.name)
            if from_source and source in modules:
                found.append(Import(module, source, node.lineno, tuple(from_source)))
    return found


def private_uses(module: str, path: Path, imports: list[Import]) -> list[tuple[str, str]]:
    """``(imported module, _name)`` for every private name of another module that ``module`` takes:
    ``from m import _x``, or ``m._x`` on a name bound to the module by an import."""
    uses = [(imp.imported, name) for imp in imports for name in imp.names if name.startswith("_")]
    tree = ast.parse(path.read_text(), str(path))
    bound = {}  # local name -> module, for "from . import m [as n]" and "import a.m as n"
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for imp in imports:
                if imp.line != node.lineno or imp.names:
                    continue
                for alias in node.names:
                    if imp.imported.endswith("." + alias.name) or imp.imported == alias.name:
                        bound[alias.asname or alias.name.rpartition(".")[2]] = imp.imported
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            uses.append((bound[node.value.id], node.attr))
    return sorted(set(uses))


def layer_of(module: str, package: str, layers: tuple[Layer, ...]) -> list[int]:
    relative = module[len(package) + 1:] if module != package else "__init__"
    return [i for i, layer in enumerate(layers) if any(fnmatch.fnmatchcase(relative, p) for p in layer.modules)]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component with a cycle (Tarjan), each rotated
    to start at its smallest module name."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        # Breadth-first within the component: the shortest way back to the start.
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w in component and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle)
    return sorted(cycles)


def check(package_dir: Path, package: str, layers: tuple[Layer, ...]) -> list[str]:
    """Every violation of the rules in ``package``, one line each (empty when it follows them)."""
    modules = module_names(package_dir, package)
    problems = []
    place = {}
    for module in modules:
        found = layer_of(module, package, layers)
        if not found:
            problems.append(f"unplaced module: {module} is in no layer; add it where its imports put it")
        elif len(found) > 1:
            problems.append(f"ambiguous table: {module} matches the layers {[layers[i].name for i in found]}")
        else:
            place[module] = found[0]
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        imports = imports_of(module, path, modules, package)
        for imp in imports:
            if imp.imported == module:
                continue
            graph[module].add(imp.imported)
        for imported in sorted(graph[module]):
            if module not in place or imported not in place:
                continue
            mine, theirs = layers[place[module]], layers[place[imported]]
            if place[imported] < place[module]:
                problems.append(f"upward import: {module} (layer {mine.name!r}) imports {imported} "
                                f"(layer {theirs.name!r})")
            elif place[imported] == place[module] and not mine.peers:
                problems.append(f"same-layer import: {module} imports {imported}, both in layer {mine.name!r}")
        if module in place and layers[place[module]].peers:
            for imported, name in private_uses(module, path, imports):
                if imported != module and place.get(imported) == place[module]:
                    problems.append(f"private name: {module} uses {name} of op module {imported}")
    for cycle in find_cycles(graph):
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


# --------------------------------------------------------------------------- the package


def test_imports_point_down():
    problems = check(PACKAGE_DIR, "progan_fast", LAYERS)
    assert not problems, "imports that break the layering:\n" + "\n".join(problems)


def test_the_checker_sees_every_module_of_the_package():
    names = module_names(PACKAGE_DIR, "progan_fast")
    assert {"progan_fast", "progan_fast.trainer", "progan_fast.ops", "progan_fast.ops._backend"} <= set(names)
    graph_edges = imports_of("progan_fast.trainer", names["progan_fast.trainer"], names, "progan_fast")
    assert {"progan_fast.config", "progan_fast.run_folder", "progan_fast.run_log"} <= {i.imported for i in graph_edges}


# --------------------------------------------------------------------------- the checker can fail

FAKE_LAYERS = (
    Layer("top", ("top",)),
    Layer("ops package", ("ops",)),
    Layer("op modules", ("ops.a", "ops.b"), peers=True),
    Layer("bottom", ("__init__", "bottom", "other")),
)


def make_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "fakepkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    for folder in {(package / name).parent for name in files}:
        (folder / "__init__.py").touch()
    return package


def test_a_package_that_follows_the_rules_passes(tmp_path):
    package = make_package(tmp_path, {
        "top.py": "from . import bottom\nfrom .ops import a\n",
        "ops/a.py": "from .b import helper\nfrom .. import bottom\n",
        "ops/b.py": "import fakepkg.bottom\ndef helper(): pass\n",
        "bottom.py": "import os\n",
        "other.py": "",
    })
    problems = check(package, "fakepkg", FAKE_LAYERS)
    assert problems == []


@pytest.mark.parametrize("where", ["module", "function", "type_checking"])
def test_an_upward_import_is_reported_wherever_it_is(tmp_path, where):
    statement = {
        "module": "from .top import thing\n",
        "function": "def f():\n    from . import top\n",
        "type_checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fakepkg.top\n",
    }[where]
    package = make_package(tmp_path, {"top.py": "thing = 1\n", "bottom.py": statement, "ops/a.py": "", "ops/b.py": ""})
    problems = check(package, "fakepkg", FAKE_LAYERS)
    assert problems == ["upward import: fakepkg.bottom (layer 'bottom') imports fakepkg.top (layer 'top')"]


def test_a_cycle_is_reported_even_between_peers(tmp_path):
    package = make_package(tmp_path, {
        "ops/a.py": "from .b import g\ndef f(): pass\n",
        "ops/b.py": "def g():\n    from .a import f\n",
        "top.py": "", "bottom.py": "",
    })
    problems = check(package, "fakepkg", FAKE_LAYERS)
    assert problems == ["import cycle: fakepkg.ops.a -> fakepkg.ops.b -> fakepkg.ops.a"]


def test_a_same_layer_import_outside_a_peer_layer_is_reported(tmp_path):
    package = make_package(tmp_path, {"bottom.py": "from . import other\n", "other.py": "", "top.py": "",
                                      "ops/a.py": "", "ops/b.py": ""})
    problems = check(package, "fakepkg", FAKE_LAYERS)
    assert problems == ["same-layer import: fakepkg.bottom imports fakepkg.other, both in layer 'bottom'"]


def test_an_unplaced_module_is_reported(tmp_path):
    package = make_package(tmp_path, {"top.py": "", "bottom.py": "", "newcomer.py": "", "ops/a.py": "", "ops/b.py": ""})
    problems = check(package, "fakepkg", FAKE_LAYERS)
    assert problems == ["unplaced module: fakepkg.newcomer is in no layer; add it where its imports put it"]


@pytest.mark.parametrize("text", ["from .b import _private\n", "from . import b\ndef f():\n    return b._private\n",
                                  "from . import b as other\nx = other._private\n"])
def test_a_private_name_of_another_op_module_is_reported(tmp_path, text):
    package = make_package(tmp_path, {"ops/a.py": text, "ops/b.py": "_private = 1\n", "top.py": "", "bottom.py": ""})
    problems = check(package, "fakepkg", FAKE_LAYERS)
    assert problems == ["private name: fakepkg.ops.a uses _private of op module fakepkg.ops.b"]
