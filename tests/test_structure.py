"""The package's shape (issue 10): two floors, no import circle, imports at the top, small modules.

Read from the source with ``ast`` (nothing is imported), so each check names the file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sparsecomm"
OPTIONAL = ("transformers", "wandb", "submitit", "hydra_plugins", "matplotlib",  # may be imported where used
            "accelerate", "lightning")  # (sparsecomm/integrations/: each module needs its stack)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> list[tuple[str, int, bool, list[str]]]:
    """``(module, line, at top level, names)`` for every import in module ``name``, resolved."""
    tree = ast.parse(MODULES[name].read_text())
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
    """The package modules ``name`` imports, each as the module that defines what it takes."""
    out = set()
    for target, _, _, names in imports(name):
        if not target.startswith("sparsecomm"):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        out.update(subs or ([target] if target in MODULES else []))
    return out - {name}


def test_the_library_never_imports_the_app():
    library = [m for m in MODULES if not m.startswith("sparsecomm.app") and not m.startswith("sparsecomm.conf")]
    assert "sparsecomm.mask" in library and "sparsecomm.hook" in library
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}" for m in library
           for t, line, _, _ in imports(m) if t.startswith("sparsecomm.app")]
    assert not bad, bad


def test_the_import_graph_has_no_circle():
    graph = {m: edges(m) for m in MODULES}
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


def test_no_module_over_400_lines_and_the_trainer_at_most_150():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
    tree = ast.parse(MODULES["sparsecomm.app.trainer"].read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert cls.end_lineno - cls.lineno + 1 <= 150


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
