"""The package's import graph has no cycle: every ``import`` inside ``awn_jax``, at the top of
a module or deferred into a function, and every ``importlib.import_module`` of a literal name,
read from the source (nothing is imported)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "awn_jax"


def _modules() -> dict:
    """Dotted name -> path of every module of the package (a package is its __init__)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(name: str, path: pathlib.Path, modules: dict) -> set:
    """The package's modules that module ``name`` imports. ``from pkg import sub`` of a
    submodule depends on ``sub``; of a name defined in ``pkg/__init__.py``, on ``pkg``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
    # Importing ``a.b.c`` runs ``a/b/__init__.py`` first: an edge to ``a.b`` too, unless
    # ``a.b`` is a package of ``name`` itself (initialized before ``name`` is imported).
    own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)} | {name}
    found |= {module.rsplit(".", k)[0] for module in found
              for k in range(1, module.count(".") + 1)}
    return {module for module in found if module in modules and module not in own}


def _cycle(graph: dict) -> list:
    """One cycle of ``graph`` as a list of nodes (first == last), or [] if it has none."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return stack[stack.index(successor):] + [successor]
            if successor not in state:
                found = visit(successor)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_importing_a_submodule_depends_on_its_package(tmp_path):
    # awn_jax.x imports awn_jax.p.q, whose package __init__ imports awn_jax.p.r, which
    # imports awn_jax.x: a cycle through the package's __init__.
    for rel, text in {"x.py": "from awn_jax.p.q import A\n", "p/__init__.py":
                      "from awn_jax.p.r import B\n", "p/q.py": "A = 1\n",
                      "p/r.py": "from awn_jax import x\n"}.items():
        path = tmp_path / "awn_jax" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    modules = {"awn_jax.x": tmp_path / "awn_jax/x.py", "awn_jax.p": tmp_path / "awn_jax/p/__init__.py",
               "awn_jax.p.q": tmp_path / "awn_jax/p/q.py", "awn_jax.p.r": tmp_path / "awn_jax/p/r.py"}
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    assert graph["awn_jax.x"] == {"awn_jax.p", "awn_jax.p.q"}
    assert graph["awn_jax.p.r"] == {"awn_jax.x"}  # not its own package
    assert _cycle(graph)


def test_no_import_cycle_inside_the_package():
    modules = _modules()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    assert "awn_jax.ops.adder_native" in graph["awn_jax.ops.adder"]  # deferred imports seen
    cycle = _cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_adder_kernels_do_not_import_the_dispatcher():
    """The kernel modules and the shared op know nothing of ``adder_conv2d``'s dispatch."""
    modules = _modules()
    for name in ("adder_vjp", "adder_xla", "adder_native", "adder_pallas"):
        imported = _imported(f"awn_jax.ops.{name}", modules[f"awn_jax.ops.{name}"], modules)
        assert not imported & {"awn_jax.ops.adder", "awn_jax.ops"}, (name, imported)


def _top_level_imports(path: pathlib.Path) -> set:
    """The first component of every module ``path`` imports by absolute name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_library_imports_nothing_from_the_repository_root(tmp_path):
    """``configs/``, the CLIs and ``bench/`` are not installed with the package: the library
    builds the paper's configs itself (``awn_jax.config``)."""
    outside = {"configs", "train", "evaluate", "analyze", "reproduce", "convert", "bench"}
    found = {name: _top_level_imports(path) & outside for name, path in _modules().items()}
    assert {name: names for name, names in found.items() if names} == {}
    example = tmp_path / "example.py"   # the rule itself, on a module that breaks it
    example.write_text("import os\nfrom configs import default\nfrom . import sibling\n")
    assert _top_level_imports(example) & outside == {"configs"}
