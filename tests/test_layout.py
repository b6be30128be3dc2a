"""The house rules of DESIGN.md, checked on the source tree: file sizes, import direction, no
import circles, one import namespace."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folder on disk -> import name (pyproject's package-dir mapping)
PACKAGES = {"fastserve_jax": "fastserve_jax", "models": "fastserve_jax.models",
            "sharding": "fastserve_jax.sharding", "serve": "fastserve_jax.serve"}
MAX_LINES = 400


def _modules() -> dict[str, str]:
    """Import name -> file, for every module of the installed packages."""
    mods = {}
    for folder, name in PACKAGES.items():
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}"
            if folder == "fastserve_jax" and rel != "." and rel.split(os.sep)[0] in PACKAGES:
                continue
            for f in files:
                if f.endswith(".py"):
                    mods[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(dirpath, f)
    return mods


def _imports(path: str, module: str, known: set[str]) -> set[str]:
    """Project modules `module` imports anywhere in its file (functions included)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known and n != module}
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, m, set(mods)) for m, p in mods.items()}


def test_no_source_file_over_the_limit():
    long = []
    for folder in (*PACKAGES, "scripts"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    p = os.path.join(dirpath, f)
                    n = sum(1 for _ in open(p))
                    if n > MAX_LINES:
                        long.append(f"{os.path.relpath(p, ROOT)}: {n}")
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_no_import_circles():
    """Tarjan's strongly connected components over module imports, package __init__ edges
    from a package's own submodules left out (Python imports the parent first by design)."""
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in _graph().items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_arrows_run_downward():
    """models imports nothing of the project but models; sharding only models and sharding."""
    allowed = {"fastserve_jax.models": ("fastserve_jax.models",),
               "fastserve_jax.sharding": ("fastserve_jax.models", "fastserve_jax.sharding")}
    bad = []
    for m, deps in _graph().items():
        for layer, ok in allowed.items():
            if m == layer or m.startswith(layer + "."):
                bad += [f"{m} -> {d}" for d in deps if not any(d == o or d.startswith(o + ".") for o in ok)]
    assert not bad, bad


@pytest.mark.parametrize("name", ["models", "sharding", "serve"])
def test_one_import_namespace(name, tmp_path):
    """The design card's folders import only as fastserve_jax.<name>, from anywhere; the
    generic top-level name fails, from outside the checkout and from its root alike."""
    ok = subprocess.run([sys.executable, "-c", f"import fastserve_jax.{name}"], cwd=tmp_path,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for cwd in (tmp_path, ROOT):
        bad = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=cwd, capture_output=True, text=True)
        assert bad.returncode != 0 and "Error" in bad.stderr, (cwd, bad.stdout)


_CHECK_FROM_IMPORTS = r'''
import ast, glob, importlib, os, sys
sys.path[:0] = ["scripts", "."]
bad = []
for f in sorted(glob.glob("scripts/*.py") + glob.glob("tests/*.py")):
    for node in ast.walk(ast.parse(open(f).read(), f)):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
            continue
        if not (node.module.startswith("fastserve_jax") or os.path.exists(f"scripts/{node.module}.py")):
            continue
        m = importlib.import_module(node.module)
        for a in node.names:
            if a.name != "*" and not hasattr(m, a.name):
                try:
                    importlib.import_module(f"{node.module}.{a.name}")
                except ImportError:
                    bad.append(f"{f}:{node.lineno}: {node.module} has no {a.name}")
import fastserve_jax
for name in fastserve_jax.__all__:      # `from fastserve_jax import *` imports each
    try:
        getattr(fastserve_jax, name)
    except AttributeError as e:
        bad.append(f"fastserve_jax.__all__ names {name}: {e}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
'''


def test_every_from_import_in_scripts_and_tests_resolves():
    """A benchmark imports helpers inside main(), where nothing but running it reaches them:
    every `from <project module or script> import name` in scripts/ and tests/ names
    something that exists (bench_tail_guard.py once imported a function that had moved), and
    so does every public name of the package (RequestOutput pointed at a module without it,
    so `from fastserve_jax import *` failed, until 2026-12-07)."""
    r = subprocess.run([sys.executable, "-c", _CHECK_FROM_IMPORTS], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
