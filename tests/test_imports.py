"""The package's dependency graph: no import cycle, every module importable on its own."""

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "mlseg_jax"


def _modules():
  names = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(REPO).with_suffix("").parts
    names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return names


def _import_graph():
  """module -> the package modules it imports, wherever in the file (functions too)."""
  modules = _modules()

  def owner(name):
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name

  graph = {m: set() for m in modules}
  for module, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        targets = [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for target in targets:
        if target.startswith("mlseg_jax."):
          dep = owner(target)
          if dep and dep not in (module, "mlseg_jax"):  # The root holds constants only.
            graph[module].add(dep)
  return graph


def test_the_package_has_no_import_cycle():
  graph, state, cycles = _import_graph(), {}, []

  def visit(module, path):
    state[module] = "open"
    for dep in sorted(graph[module]):
      if state.get(dep) == "open":
        cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
      elif dep not in state:
        visit(dep, path + [dep])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, "\n".join(cycles)


def test_the_root_package_imports_nothing_of_its_own():
  """Its constants import without cycles, and `import mlseg_jax` loads no JAX: the Python
  API (mlseg_jax.Segmenter) is imported on first use, inside a function."""
  tree = ast.parse((PACKAGE / "__init__.py").read_text())
  assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
  loaded = subprocess.run(
      [sys.executable, "-c", "import sys, mlseg_jax; print(sorted(m for m in sys.modules "
       "if m.startswith(('mlseg_jax.', 'jax'))))"],
      cwd=PACKAGE.parent, capture_output=True, text=True, check=True).stdout.strip()
  assert loaded == "[]", loaded


def test_every_module_imports_in_a_fresh_interpreter():
  modules = sorted(_modules())
  code = "import importlib\nfor m in %r:\n  importlib.import_module(m)\n" % modules
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert result.returncode == 0, result.stderr[-3000:]
