"""The package's shape: the library core never imports the application (seedslot.app), its modules
import each other without circles, and importing seedslot has no side effects."""

import ast
import pathlib
import subprocess
import sys

import seedslot

ROOT = pathlib.Path(seedslot.__file__).parent


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: pathlib.Path, top_level_only: bool = False) -> set[str]:
    """The seedslot modules ``path`` imports (anywhere in it, or only at module level)."""
    tree = ast.parse(path.read_text())
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("seedslot"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("seedslot"):
                continue
            found.add(mod)
            for a in node.names:  # ``from . import x`` imports a module
                if (ROOT.parent / (mod.replace(".", "/") + f"/{a.name}.py")).exists():
                    found.add(f"{mod}.{a.name}")
    return found


# ``python -m seedslot`` (__main__) is the command's door, not part of the library
CORE = [p for p in ROOT.rglob("*.py") if "app" not in p.relative_to(ROOT).parts and p.name != "__main__.py"]


def test_the_core_never_imports_the_application():
    bad = {_module(p): sorted(m for m in _imports(p) if m == "seedslot.app" or m.startswith("seedslot.app."))
           for p in CORE}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_core_has_no_import_circles():
    graph = {_module(p): {m for m in _imports(p, top_level_only=True) if m != _module(p)} for p in CORE}
    graph = {m: {d for d in deps if d in graph and d != "seedslot"} for m, deps in graph.items()}
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for d in sorted(graph[m]):
            visit(d)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_importing_seedslot_has_no_side_effects():
    code = (
        "import sys, torch.optim.optimizer as o\n"
        "before = len(o._global_optimizer_pre_hooks)\n"
        "import seedslot\n"
        "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'seedslot.app', 'numba'))))\n"
        "print(len(o._global_optimizer_pre_hooks) - before)\n"
        "seedslot.SlotLinear(2, 2)\n"
        "print(len(o._global_optimizer_pre_hooks) - before)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["[]", "0", "1"]  # the guard comes with the first seeded layer
