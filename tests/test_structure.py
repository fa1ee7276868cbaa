"""The project's shape: two floors, no import circle, imports at the top, small modules, and the
benchmarks and the cluster scripts as packages that drive the app instead of training on their own.

Read from the source with ``ast`` (nothing is imported), so each check names the file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sparsecomm"
PACKAGES = ("sparsecomm", "benchmarks", "cluster")  # the project's importable packages
SCRIPT_DIRS = ("sparsecomm", "benchmarks", "cluster", "tests", "examples")  # every Python file of the project
OPTIONAL = ("transformers", "wandb", "submitit", "hydra_plugins", "matplotlib",  # may be imported where used
            "accelerate", "lightning",  # (sparsecomm/integrations/: each module needs its stack)
            "sklearn")  # prepares the digits split only when it is not cached (tasks/cache.py)
MAX_MODULE_LINES = 400
TRAINER_MAX_LINES = 150  # the Trainer class of sparsecomm/app/trainer.py, first line to last


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ALL_MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
MODULES = {m: p for m, p in ALL_MODULES.items() if m.split(".")[0] == "sparsecomm"}  # the library and the app
SOURCES = sorted(p for d in SCRIPT_DIRS for p in (ROOT / d).rglob("*.py"))


def is_package(name: str) -> bool:
    return ALL_MODULES[name].name == "__init__.py"


def imports(name: str) -> list[tuple[str, int, bool, list[str]]]:
    """``(module, line, at top level, names)`` for every import in module ``name``, resolved."""
    tree = ast.parse(ALL_MODULES[name].read_text())
    top = {id(n) for n in tree.body}
    base = name if is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                target = f"{pkg}.{node.module}" if node.module else pkg
            else:
                target = node.module
            out.append((target, node.lineno, id(node) in top, [a.name for a in node.names]))
    return out


def edges(name: str) -> set[str]:
    """The project modules ``name`` imports, each as the module that defines what it takes."""
    out = set()
    for target, _, _, names in imports(name):
        if target.split(".")[0] not in PACKAGES:
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in ALL_MODULES]
        out.update(subs or ([target] if target in ALL_MODULES else []))
    return out - {name}


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def test_the_library_never_imports_the_app():
    library = [m for m in MODULES if not m.startswith("sparsecomm.app") and not m.startswith("sparsecomm.conf")]
    assert "sparsecomm.mask" in library and "sparsecomm.hook" in library
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}" for m in library
           for t, line, _, _ in imports(m) if t.startswith("sparsecomm.app")]
    assert not bad, bad


def test_the_import_graph_has_no_circle():
    """Across the library, the app, the benchmarks and the cluster scripts."""
    graph = {m: edges(m) for m in ALL_MODULES}
    assert {"benchmarks.comm", "benchmarks.comm_multinode", "cluster.box"} <= set(graph)
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [m, n])
                                     if n in path else f"import circle through {m} -> {n}")
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_imports_are_at_the_top_except_optional_dependencies():
    late = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t} inside a function"
            for m in MODULES for t, line, top, _ in imports(m)
            if not top and not t.startswith(OPTIONAL) and t != "__future__"]
    assert not late, late


def test_package_modules_import_modules_not_the_package_namespace():
    """``from sparsecomm.mask import Mask``, not ``from sparsecomm import Mask`` (which hides the edge)."""
    bad = []
    for m in MODULES:
        for target, line, _, names in imports(m):
            if target in MODULES and is_package(target) and target != m:
                hidden = [n for n in names if f"{target}.{n}" not in MODULES and target != "sparsecomm.app.masks"]
                if hidden:
                    bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} takes {hidden} from the package {target}")
    assert not bad, bad


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ALL_MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by responsibility): {long}"


def test_the_trainer_is_small():
    tree = ast.parse(MODULES["sparsecomm.app.trainer"].read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    lines = cls.end_lineno - cls.lineno + 1
    assert lines <= TRAINER_MAX_LINES, f"Trainer is {lines} lines, at most {TRAINER_MAX_LINES}"


def test_every_mask_kind_has_its_yaml_and_every_yaml_its_kind():
    from sparsecomm.app.masks import MASK_KINDS

    yamls = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "conf" / "mask").glob("*.yaml")}
    assert set(MASK_KINDS) == set(yamls) == {"dense", "fisher", "random", "file", "width_core", "diff_pruning",
                                            "fisher_scaled", "token_rows", "learned", "lottery"}
    for name, body in yamls.items():
        assert body.get("name", name) == name, f"conf/mask/{name}.yaml says name: {body.get('name')}"
        assert MASK_KINDS[name].__module__ == f"sparsecomm.app.masks.{name}"


@pytest.mark.parametrize("name", ["Mask", "fisher_mask", "random_mask", "register_masked_allreduce", "MaskedSGD",
                                  "MaskedAdamW", "DiffPruning", "diff"])
def test_the_public_api_keeps_its_names(name):
    import sparsecomm

    assert name in sparsecomm.__all__ and getattr(sparsecomm, name) is not None


# --- the benchmarks and the cluster scripts: packages that drive the app ----------------------------


def test_the_layers_import_downwards():
    """sparsecomm never imports the benchmarks or the cluster scripts; the cluster scripts (stdlib
    only, run as root by any Python) import neither sparsecomm nor the benchmarks."""
    bad = []
    for m in ALL_MODULES:
        floor = m.split(".")[0]
        forbidden = {"sparsecomm": ("benchmarks", "cluster"), "cluster": ("benchmarks", "sparsecomm", "torch"),
                     "benchmarks": ()}[floor]
        bad += [f"{ALL_MODULES[m].relative_to(ROOT)}:{line} imports {t}" for t, line, _, _ in imports(m)
                if t.split(".")[0] in forbidden]
    assert not bad, bad


def _sys_path_edits(tree: ast.AST) -> list[ast.AST]:
    """``sys.path.insert/append/extend(...)``, ``sys.path[...] = ...``, ``sys.path += ...`` and
    ``importlib.util.spec_from_file_location`` (a module loaded by its path)."""
    def is_sys_path(n):
        return isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name) and n.value.id == "sys"

    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            if n.func.attr in ("insert", "append", "extend") and is_sys_path(n.func.value):
                found.append(n)
            elif n.func.attr == "spec_from_file_location":
                found.append(n)
        elif isinstance(n, (ast.Assign, ast.AugAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            if any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets):
                found.append(n)
    return found


def test_no_file_edits_sys_path_or_loads_a_module_by_its_path():
    """Benchmarks, tests, cluster scripts and examples import packages (``python -m``, pytest's
    ``pythonpath``), never a folder pushed onto ``sys.path``."""
    assert any(p.parts[-2] == "benchmarks" for p in SOURCES) and any(p.parts[-2] == "examples" for p in SOURCES)
    bad = [where(p, n) for p in SOURCES for n in _sys_path_edits(ast.parse(p.read_text()))]
    assert not bad, bad


def steps_and_ddp(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, what)`` for every ``.backward(`` call and every ``DistributedDataParallel(...)``
    construction (under any name the module imports it as)."""
    ddp_names = {"DistributedDataParallel"}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            ddp_names |= {a.asname for a in n.names if a.name == "DistributedDataParallel" and a.asname}
    found = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call):
            continue
        f = n.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name == "backward" and isinstance(f, ast.Attribute):
            found.append((n.lineno, ".backward("))
        elif name in ddp_names:
            found.append((n.lineno, f"{name}("))
    return found


def test_steps_and_ddp_are_built_only_in_the_app_and_the_library():
    """The benchmarks and the cluster scripts drive ``sparsecomm.app.trainer.run``: no training
    loop (``.backward(``) and no DDP set-up of their own."""
    sources = [p for d in ("benchmarks", "cluster") for p in sorted((ROOT / d).rglob("*.py"))]
    found = {str(p.relative_to(ROOT)): [f"{line}: {what}" for line, what in steps_and_ddp(ast.parse(p.read_text()))]
             for p in sources}
    bad = {f: hits for f, hits in found.items() if hits}
    assert not bad, bad


def test_the_step_and_ddp_finder_finds_them():
    """The finder above on a snippet written here: a loop, DDP under an alias, and the false friends."""
    src = (
        "from torch.nn.parallel import DistributedDataParallel as DDP\n"
        "import torch\n"
        "net = DDP(model)\n"
        "net2 = torch.nn.parallel.DistributedDataParallel(model)\n"
        "loss.backward()\n"
        "torch.autograd.backward(loss)\n"
        "text = 'x.backward()'  # a string, not a call\n"
        "backward = 1\n"
    )
    assert sorted(line for line, _ in steps_and_ddp(ast.parse(src))) == [3, 4, 5, 6]
    edits = "import sys, importlib.util\nsys.path.insert(0, 'x')\nsys.path.append('y')\nsys.path[:0] = ['z']\n" \
            "importlib.util.spec_from_file_location('m', 'm.py')\nprint(sys.path)\n"
    assert sorted(n.lineno for n in _sys_path_edits(ast.parse(edits))) == [2, 3, 4, 5]
