"""The layering ARCHITECTURE.md describes, checked on the source: what each layer may
import, no import cycle, and SQL only in scalebox_hpc/db/."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "scalebox_hpc"

# Layer -> the layers it may import (besides itself). A layer is a module or a package
# of scalebox_hpc; the first matching prefix decides. Lazy imports inside functions count.
FOUNDATION = {"states", "errors", "backoff"}
ALLOWED = {
    "states": set(),
    "errors": set(),
    "backoff": set(),
    "retry": FOUNDATION,
    "yamlcheck": FOUNDATION,
    "taskfiles": FOUNDATION,
    "resources": FOUNDATION,
    "policy": FOUNDATION,
    "intask": set(),
    "laneproc": set(),
    "appdef": FOUNDATION | {"retry", "yamlcheck", "resources"},
    "config": FOUNDATION | {"db"},
    "db": FOUNDATION | {"retry", "appdef"},
    "runtimes": FOUNDATION | {"appdef", "resources", "intask"},
    "ssh": FOUNDATION,
    "transport": FOUNDATION | {"ssh"},
    "transfer": FOUNDATION | {"ssh"},
    "siteconfig": FOUNDATION | {"yamlcheck", "ssh"},
    "sites": FOUNDATION | {"siteconfig", "transport", "ssh", "transfer", "db.rows", "resources"},
    "worker": FOUNDATION | {"retry", "appdef", "taskfiles", "resources", "policy", "db", "runtimes", "transfer",
                            "sites.launch", "intask", "laneproc"},
    "controller": FOUNDATION | {"db", "sites"},
    "sitecheck": FOUNDATION | {"db", "sites", "siteconfig", "transport"},
    "report": FOUNDATION | {"db"},
    "progress": FOUNDATION | {"report"},
    "cli": None,           # the command line may call anything
    "__main__": None,
    "__init__": set(),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """scalebox_hpc modules imported anywhere in the file, as dotted names inside the package."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("scalebox_hpc"):
                target = node.module.removeprefix("scalebox_hpc").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE / sub.replace(".", "/")).is_dir() else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("scalebox_hpc."):
                    found.add(alias.name.removeprefix("scalebox_hpc."))
    return {f for f in found if f and f != name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    for layer in sorted((k for k in ALLOWED if k != "__init__"), key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module


def _allowed(importer: str, imported: str) -> bool:
    layer = _layer(importer)
    rules = ALLOWED.get(layer, set())
    if rules is None or _layer(imported) == layer:
        return True
    return any(imported == rule or imported.startswith(rule + ".") for rule in rules)


def test_every_module_has_a_layer():
    unknown = sorted(m for m in _graph() if _layer(m) not in ALLOWED and m != "")
    assert not unknown, f"modules ARCHITECTURE.md does not place: {unknown}"


def test_layers_import_only_what_they_may():
    wrong = sorted(f"{importer} imports {imported}" for importer, targets in _graph().items()
                   for imported in targets if not _allowed(importer, imported))
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = _graph()

    def resolve(name: str) -> str:
        while name and name not in graph:
            name = name.rpartition(".")[0]
        return name

    edges = {m: {resolve(t) for t in targets} - {m, ""} for m, targets in graph.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_sql_only_in_db():
    pattern = re.compile(r"\.(q|one)\(|QUERIES|\.execute\(|\.cursor\(|\.copy\(")
    found = [f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}"
             for p in PACKAGE.rglob("*.py") if "db" not in p.relative_to(PACKAGE).parts
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)
