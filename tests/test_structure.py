"""The package's structure, checked from its source: layers that only import downwards and close no circle, no
private names imported across modules, no printing outside the command lines, every exception raised on purpose
derived from the library's base class, no function over 80 lines of code (outside the kernels)."""
import ast
import builtins
import importlib
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

import smi_timm.errors

REPO = Path(__file__).resolve().parents[1]

#: layer of each top-level part of the package: a module imports only from its own layer or the ones below
LAYERS: Dict[str, int] = {
    "smi_timm.errors": 0, "smi_timm.layout": 0, "smi_timm.curves": 0,
    "smi_timm.kernels": 1,
    "smi_timm.losses": 2,
    "smi_timm": 3, "smi_timm.models": 3, "smi_timm.data": 3,
    "smi_timm.export": 4,
    "smi_timm.resolve": 5,
    "smi_timm.eval": 6, "smi_timm.analysis": 6, "smi_timm.spatial": 6,
    "smi_timm.train": 7,
    "smi_timm.publish": 8,
    "smi_timm.cli": 9,
}
#: modules that ``import smi_timm`` loads: the only ones allowed imports inside functions (to stay light)
LIGHT = ("smi_timm", "smi_timm.models", "smi_timm.errors", "smi_timm.layout")


def _modules() -> Dict[str, Path]:
    mods = {}
    for path in sorted((REPO / "smi_timm").rglob("*.py")):
        if "kernels" in path.relative_to(REPO / "smi_timm").parts:
            continue  # an installed copy; the source is kernels/
        parts = path.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "kernels").glob("*.py")):
        mods["smi_timm.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return mods


MODULES = _modules()


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _walk(tree: ast.AST, in_function: bool = False, type_only: bool = False) -> Iterator[Tuple[ast.AST, bool, bool]]:
    """Every node with (inside a function?, inside ``if TYPE_CHECKING:``?)."""
    for node in ast.iter_child_nodes(tree):
        is_tc = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        fn = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield node, fn, type_only
        yield from _walk(node, fn, type_only or is_tc)


def _targets(module: str, node: ast.AST) -> List[Tuple[str, str]]:
    """``(imported module, imported name or '')`` pairs of an import statement, package modules only."""
    is_pkg = MODULES[module].name == "__init__.py"
    if isinstance(node, ast.Import):
        return [(a.name, "") for a in node.names if a.name.split(".")[0] == "smi_timm"]
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    if prefix.split(".")[0] != "smi_timm":
        return []
    return [(f"{prefix}.{a.name}", "") if f"{prefix}.{a.name}" in MODULES else (prefix, a.name) for a in node.names]


def _imports() -> List[Tuple[str, str, str, bool, int]]:
    """(importer, imported module, imported name, inside a function?, line) of every import of the package."""
    out = []
    for module, path in MODULES.items():
        for node, in_fn, type_only in _walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not type_only:
                out += [(module, target, name, in_fn, node.lineno) for target, name in _targets(module, node)]
    return out


IMPORTS = _imports()


def test_imports_go_down_the_layers():
    up = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)}), line {line}"
          for a, b, _, _, line in IMPORTS if _layer(b) > _layer(a)]
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def test_no_import_circle():
    graph: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for a, b, _, _, _ in IMPORTS:
        if b in graph and a != b:
            graph[a].add(b)
    # Tarjan's strongly connected components: any component of more than one module is a circle
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_imports_inside_functions_only_keep_import_smi_timm_light():
    lines = {m: p.read_text(encoding="utf-8").splitlines() for m, p in MODULES.items()}
    bad = []
    for a, b, _, in_fn, line in IMPORTS:
        if not in_fn:
            continue
        text = lines[a][line - 1] + " " + lines[a][line - 2]
        if a not in LIGHT or "light" not in text:
            bad.append(f"{a}:{line} imports {b} inside a function")
    assert not bad, "\n".join(bad)


def test_no_private_names_imported_across_modules():
    bad = [f"{a}:{line} imports {name} from {b}" for a, b, name, _, line in IMPORTS
           if name.startswith("_") and name not in ("__version__",)]
    for module, path in MODULES.items():  # module._name on a module of the package imported under an alias
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node, _, _ in _walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias, (target, name) in zip(node.names, _targets(module, node) or [("", "")] * len(node.names)):
                    if target in MODULES and not name:
                        aliases[alias.asname or alias.name.split(".")[-1]] = target
        for node, _, _ in _walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_only_the_command_lines_print():
    bad = []
    for module, path in MODULES.items():
        if module.startswith("smi_timm.cli"):
            continue
        for node, _, _ in _walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{module}:{node.lineno}")
    assert not bad, "print() outside smi_timm/cli/ (use logging): " + ", ".join(bad)


#: built-in exceptions a module may still raise: the protocol of module ``__getattr__`` and re-raises
ALLOWED_BUILTIN = {"AttributeError", "NotImplementedError", "StopIteration", "KeyboardInterrupt", "SystemExit"}


def test_every_exception_raised_derives_from_the_base_class():
    bad = []
    for module, path in MODULES.items():
        mod = importlib.import_module(module)
        for node, _, _ in _walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Raise) and node.exc is not None):
                continue
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = ast.unparse(exc)
            if name in ALLOWED_BUILTIN:
                continue
            obj = getattr(mod, name, None) if "." not in name else None
            if obj is None and hasattr(builtins, name):
                obj = getattr(builtins, name)
            if isinstance(obj, type) and issubclass(obj, BaseException):
                if not issubclass(obj, smi_timm.errors.SmiTimmError):
                    bad.append(f"{module}:{node.lineno} raises {name}")
            # anything else is a re-raise of a caught exception object (``raise err``)
    assert not bad, "exceptions that do not derive from smi_timm.errors.SmiTimmError:\n" + "\n".join(bad)


def _code_lines(lines: List[str], node: ast.AST) -> int:
    doc = set()
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        doc = set(range(first.lineno, first.end_lineno + 1))
    return sum(1 for i in range(node.lineno, node.end_lineno + 1)
               if i not in doc and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))


@pytest.mark.parametrize("limit", [80])
def test_no_function_over_80_lines_outside_the_kernels(limit):
    long = []
    for module, path in MODULES.items():
        if module.startswith("smi_timm.kernels"):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for node, _, _ in _walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(lines, node) > limit:
                long.append(f"{module}.{node.name}: {_code_lines(lines, node)} lines")
    assert not long, "\n".join(long)


def test_the_checks_see_the_package():
    # the tests above would pass on an empty list: make sure they look at every layer
    assert {_layer(m) for m in MODULES} == set(LAYERS.values())
    assert len(IMPORTS) > 100 and any(b.startswith("smi_timm.kernels") for _, b, _, _, _ in IMPORTS)
