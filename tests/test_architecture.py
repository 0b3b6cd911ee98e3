"""Contracts of the package's layout (docs/interfaces.md): dependencies point one way, compute code
is headless, shared engine code never names a variant, imports sit at module level."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import napari_medseg

PKG = pathlib.Path(napari_medseg.__file__).parent
COMPUTE = ("io", "models", "engine")
#: Modules allowed to import their own submodules inside functions: io's dispatcher loads a format's
#: module (and with it pydicom, highdicom or SimpleITK) only when a file of that format is read.
DEFERRED_OK = ("napari_medseg.io.dispatch",)
#: Variant names that only variants (and the models they serve) may mention.
VARIANT_WORDS = ("pfseg", "previous_stage")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_compute(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and parts[1] in COMPUTE


def _run_python(code: str, timeout: float = 300) -> None:
    """Run ``code`` in a fresh interpreter; fail with its output unless it exits 0."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The napari_medseg modules an import statement loads (the named module itself, or for
    ``from pkg import name`` the submodule ``pkg.name`` when there is one, else ``pkg``)."""
    known = _modules()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(max(0, node.level - 1)):
        base = base.rpartition(".")[0]
    target = node.module or ""
    if node.level:
        target = f"{base}.{target}" if target else base
    if not target.startswith("napari_medseg"):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return [m for m in out if m in known]


def _import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in tree.body:  # module level only: the imports that run when the module loads
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_resolve(name, node, path.name == "__init__.py"))
        graph[name] = edges - {name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_module_imports_have_no_cycle():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_compute_code_imports_no_package_module_inside_functions():
    """Function-level imports hid the old cycles; compute code imports at module level (the CLI
    and the widgets defer heavy imports on purpose: torch must not slow napari's start)."""
    offenders = []
    for name, path in _modules().items():
        if not (_is_compute(name) or name == "napari_medseg.api") or name in DEFERRED_OK:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and _resolve(
                        name, inner, path.name == "__init__.py"
                    ):
                        offenders.append(f"{name}:{inner.lineno}")
    assert offenders == []


def test_shared_engine_code_never_names_a_variant():
    offenders = []
    for path in (PKG / "engine").rglob("*.py"):
        if "variants" in path.relative_to(PKG).parts:
            continue
        text = path.read_text().lower()
        offenders += [f"{path.relative_to(PKG)}: {w}" for w in VARIANT_WORDS if w in text]
    assert offenders == []


def test_files_stay_readable():
    """Files of at most ~400 lines (the widgets and models are the next to split)."""
    long = {
        str(p.relative_to(PKG)): n
        for p in (PKG / "engine").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 420
    }
    assert long == {}


def test_every_compute_module_imports_headless():
    """Import every compute module (and the public API) in a fresh interpreter: no Qt, no napari."""
    names = sorted(n for n in _modules() if _is_compute(n))
    code = (
        "import importlib, sys\n"
        f"for name in {names + ['napari_medseg.api', 'napari_medseg.cli']!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = [m for m in ('qtpy', 'napari', 'PyQt5', 'vispy') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    _run_python(code, timeout=300)
    assert len(names) > 40


def test_every_module_imports_first():
    """Each module imported first, into an interpreter with no napari_medseg module loaded yet (a
    cycle through package ``__init__`` files fails only for some import orders)."""
    names = sorted(n for n in _modules() if not n.startswith("napari_medseg.widgets") and n != "napari_medseg._launcher")
    code = (
        "import importlib, sys, traceback\n"
        "import torch, numpy, scipy.ndimage  # heavy and order-independent: loaded once\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('napari_medseg')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    _run_python(code, timeout=600)


def test_package_import_is_light_and_the_api_documented():
    code = (
        "import sys, napari_medseg as m\n"
        "assert 'torch' not in sys.modules, 'importing the package imported torch'\n"
        "for name in m.__all__:\n"
        "    obj = getattr(m, name)\n"
        "    assert name == '__version__' or (obj.__doc__ or '').strip(), name\n"
        "assert 'PredictionResult' in (m.predict.__doc__ or '')\n"
    )
    _run_python(code, timeout=300)
