"""Imports go one way: every import in `fewstep/` (lazy ones too) against the layer table of
`docs/architecture.md`, and no cycle between modules. The checker is shown to fail on a tree that breaks
each rule."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layer_table(doc: Path) -> dict[str, set[str]]:
    """`package → packages it may import`, read from the architecture doc's "may import" table."""
    rules: dict[str, set[str]] = {}
    for line in doc.read_text().splitlines():
        m = re.fullmatch(r"\| `(fewstep[\w.]*)` \| (.+) \|", line.strip())
        if m:
            allowed = set(re.findall(r"`(fewstep[\w.]*)`", m.group(2)))
            rules[m.group(1)] = {"*"} if "every package" in m.group(2) else allowed
    return rules


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> dict[str, set[str]]:
    """Every module under `root/fewstep` → the fewstep modules it imports, anywhere in its body."""
    files = {module_name(p, root): p for p in (root / "fewstep").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for a in node.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
        graph[name] = {m for m in found if m == "fewstep" or m.startswith("fewstep.")}
    return graph


def package_of(module: str, rules: dict[str, set[str]]) -> str:
    """The longest package in the table that holds `module`."""
    candidates = [p for p in rules if module == p or module.startswith(p + ".")]
    assert candidates, f"{module} is in no package of the layer table"
    return max(candidates, key=len)


def upward(graph: dict[str, set[str]], rules: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        if module == "fewstep":
            continue
        mine = package_of(module, rules)
        for target in sorted(targets):
            if target == "fewstep":
                bad.append(f"{module} imports the top-level package")
                continue
            theirs = package_of(target, rules)
            if theirs != mine and "*" not in rules[mine] and theirs not in rules[mine]:
                bad.append(f"{module} → {target} ({mine} may not import {theirs})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_layer_table_covers_every_package() -> None:
    rules = layer_table(ROOT / "docs/architecture.md")
    assert {"fewstep.errors", "fewstep.models", "fewstep.service", "fewstep.cli"} <= set(rules)
    for module in imports(ROOT):
        if module != "fewstep":
            package_of(module, rules)


def test_no_upward_import_and_no_cycle() -> None:
    rules = layer_table(ROOT / "docs/architecture.md")
    graph = imports(ROOT)
    assert sum(len(t) for t in graph.values()) > 200  # it did find the imports
    assert upward(graph, rules) == []
    assert cycles(graph) == []
    assert not any(
        t.startswith("fewstep.trainer") for m, ts in graph.items() if m.startswith("fewstep.service") for t in ts
    )


def test_the_checker_catches_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "fewstep"
    for sub in ("models", "service"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from fewstep.service import b\n")  # lazy and upward
    (pkg / "service" / "b.py").write_text("from fewstep.models.a import f\n")
    (pkg / "service" / "c.py").write_text("from . import d\n")
    (pkg / "service" / "d.py").write_text("import fewstep.service.c\n")
    rules = {"fewstep.models": set(), "fewstep.service": {"fewstep.models"}}
    graph = imports(tmp_path)
    assert upward(graph, rules) == [
        "fewstep.models.a → fewstep.service.b (fewstep.models may not import fewstep.service)"
    ]
    assert cycles(graph) == [["fewstep.models.a", "fewstep.service.b"], ["fewstep.service.c", "fewstep.service.d"]]


LAZY_LIBRARIES = ("diffusers", "transformers")


def direct_imports_of(root: Path, libraries: tuple[str, ...]) -> list[str]:
    """`module: library` for every import statement (lazy ones too) of `libraries` under `root/fewstep`."""
    found = []
    for path in sorted((root / "fewstep").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [f"{module_name(path, root)}: {n}" for n in names if n.split(".")[0] in libraries]
    return found


def test_diffusers_and_transformers_are_reached_only_through_models_lazy() -> None:
    # Their lazily resolved names are not thread-safe: two engines loading in parallel threads made one
    # fail with "cannot import name 'UNet2DConditionModel' from 'diffusers'" (`fewstep/models/lazy.py`).
    assert direct_imports_of(ROOT, LAZY_LIBRARIES) == []


def test_the_lazy_import_check_sees_a_function_level_import(tmp_path: Path) -> None:
    (tmp_path / "fewstep").mkdir()
    (tmp_path / "fewstep" / "a.py").write_text("def f():\n    from diffusers import UNet2DConditionModel\n")
    (tmp_path / "fewstep" / "b.py").write_text("import transformers.models\nimport torch\n")
    assert direct_imports_of(tmp_path, LAZY_LIBRARIES) == ["fewstep.a: diffusers", "fewstep.b: transformers.models"]


def test_tests_mirror_the_source_tree() -> None:
    """Each test folder is a package's (`tests/service/queue/` tests `fewstep/service/queue/`; `tests/deploy/`
    tests the manifests), and a `test_<module>.py` beside a module of that name imports it, or runs the `fewstep`
    command whose code it is (`fewstep.cli`, or `tests.conftest`'s `fewstep serve` / `fewstep worker`): a test
    file named for a module tests that module."""
    graph = imports(ROOT)
    command, todo = set(), ["fewstep.cli"]
    while todo:
        name = todo.pop()
        if name not in command:
            command.add(name)
            todo += graph.get(name, set())
    for folder in (p.parent for p in (ROOT / "tests").rglob("test_*.py")):
        rel = folder.relative_to(ROOT / "tests")
        assert rel.parts[:1] == ("deploy",) or (ROOT / "fewstep" / rel).is_dir(), f"tests/{rel} mirrors no package"
    for test in (ROOT / "tests").rglob("test_*.py"):
        rel = test.relative_to(ROOT / "tests")
        source = ROOT / "fewstep" / rel.parent / f"{test.stem.removeprefix('test_')}.py"
        if source.is_file():
            module = module_name(source, ROOT)
            uses = imported(test)
            runs = bool(uses & {"fewstep.cli", "tests.conftest"}) and module in command
            assert module in uses or runs, f"tests/{rel} never reaches {module}"


def imported(path: Path) -> set[str]:
    """The modules a file imports (`from a.b import c` counts `a.b` and `a.b.c`), anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found
