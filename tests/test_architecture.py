"""The package's architecture, read from the files themselves (so it stays right as modules are added).

- Layers: primitives (the modules directly in dfq/) at the bottom, the leaf ones (io, cells) importing nothing of
  dfq and the others only leaf primitives; fp32/, generation/ and quant/ peers over them; deploy/ over quant and
  fp32; pipeline/ (and dfq/__init__.py, the public face) over everything; nothing in dfq imports stages/, cli/,
  bench/ or tests/.
- No import cycle among dfq's modules; no import of a dfq module inside a function (heavy optional third-party
  packages such as onnx, onnxruntime, mlflow, matplotlib, pandas may be imported there: they are not dfq).
- dvc.yaml: each stage's code deps are exactly the import closure of its script (dfq.provenance.code_files);
  dvc.lock holds no entry of a stage dvc.yaml does not define.
- Sizes: functions of at most 60 lines, modules of at most 400 (stage scripts 80); ``Args:`` in the docstring of a
  public function with more than 4 parameters.

``python -m tests.test_architecture [ROOT]`` prints the import graph's summary (modules, levels, edges, cycles) of
the checkout at ROOT (default: this one).
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from stages._common import stage_code

ROOT = Path(__file__).resolve().parents[1]
LEAF_PRIMITIVES = {"dfq.io", "dfq.cells"}  # import nothing from dfq
PEERS = {"fp32", "generation", "quant"}  # import primitives and their own package only
ALLOWED_PACKAGES = {"fp32": set(), "generation": set(), "quant": set(), "deploy": {"quant", "fp32"}}
TOP = {"pipeline"}  # may import anything in dfq (so may dfq/__init__.py)
OUTSIDE = ("stages", "cli", "bench", "tests")  # above the library
MAX_FUNCTION, MAX_MODULE, MAX_STAGE, MAX_PARAMS = 60, 400, 80, 4


# ---------------------------------------------------------------- reading the graph


def modules(root: Path = ROOT, top: str = "dfq") -> dict[str, Path]:
    """Dotted name -> file of every .py module under ``root/top`` (a package is its ``__init__.py``)."""
    out = {}
    for f in sorted((root / top).rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        parts = f.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


class _Imports(ast.NodeVisitor):
    """(imported dotted names, line, inside a function?) of one module; ``from a import b`` gives a.b and a."""

    def __init__(self, package: str):
        self.package, self.depth, self.found = package, 0, []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        self.found += [([alias.name], node.lineno, self.depth > 0) for alias in node.names]

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
        self.found += [([f"{base}.{alias.name}", base], node.lineno, self.depth > 0) for alias in node.names]


def imports(name: str, path: Path) -> list[tuple[list[str], int, bool]]:
    """Each import of module ``name``: (candidate dotted names, most specific first; line; inside a function?)."""
    visitor = _Imports(name if path.name == "__init__.py" else name.rpartition(".")[0])
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor.found


def edges(root: Path = ROOT, lazy: bool | None = None) -> dict[tuple[str, str], int]:
    """(importer, imported) -> line, between dfq's modules; ``lazy``: only function-level (True), only module-level
    (False) or both (None). ``from dfq.x import y`` is an edge to dfq.x.y when that is a module, else to dfq.x."""
    mods = modules(root)
    out = {}
    for name, path in mods.items():
        for candidates, line, inside in imports(name, path):
            target = next((c for c in candidates if c in mods), None)
            if target and target != name and (lazy is None or inside == lazy):
                out.setdefault((name, target), line)
    return out


def components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of ``graph`` (Tarjan), each module in exactly one."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while not comp or w != v:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
            comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (a -> ... -> a) through each strongly connected component of more than one module."""
    found = []
    for comp in (c for c in components(graph) if len(c) > 1):
        start = min(comp)
        paths, seen = [[start]], {start}
        while paths:  # breadth first inside the component, back to start
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in comp)
            if start in nxt:
                found.append([*path, start])
                break
            for w in (w for w in nxt if w not in seen):
                seen.add(w)
                paths.append([*path, w])
    return found


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """A longest import chain (importer first); the modules of a cycle count as one link (shown as one of them)."""
    comp_of = {v: i for i, comp in enumerate(components(graph)) for v in comp}
    members = defaultdict(list)
    for v, i in sorted(comp_of.items()):
        members[i].append(v)
    memo = {}

    def chain(i):
        if i not in memo:
            below = sorted({comp_of[w] for u in members[i] for w in graph.get(u, ()) if comp_of[w] != i})
            memo[i] = [members[i][0], *max((chain(j) for j in below), key=len, default=[])]
        return memo[i]

    return max((chain(i) for i in sorted(members)), key=len, default=[])


def levels(graph: dict[str, set[str]]) -> int:
    """The number of modules in the longest import chain (a module that imports no dfq module is level 1)."""
    return len(longest_chain(graph))


def summary(root: Path = ROOT) -> str:
    """Modules, levels, edges and cycles of dfq's import graph, module-level imports and all imports."""
    mods = modules(root)
    n_pkg = sum(1 for p in mods.values() if p.name == "__init__.py")
    lines = [
        f"{root}: {len(mods) - n_pkg} dfq modules (+ {n_pkg} package __init__.py), "
        f"{sum(len(p.read_text().splitlines()) for p in mods.values())} lines"
    ]
    for what, lazy in (("module-level imports", False), ("all imports (with function-level)", None)):
        graph = {m: set() for m in mods}
        for a, b in edges(root, lazy):
            graph[a].add(b)
        cyc = cycles(graph)
        lines.append(
            f"  {what}: {levels(graph)} levels, {sum(map(len, graph.values()))} edges, {len(cyc)} cycles"
            f"\n    longest chain: {' -> '.join(longest_chain(graph))}"
            + "".join(f"\n    cycle: {' -> '.join(c)}" for c in cyc)
        )
    n_lazy = len(
        {
            (name, line)
            for name, path in mods.items()
            for cands, line, inside in imports(name, path)
            if inside and any(c in mods for c in cands)
        }
    )
    lines.append(
        f"  function-level imports of dfq modules in dfq: {n_lazy} statements, "
        f"{len(edges(root, lazy=True))} module pairs"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- layers, cycles, lazy imports


def layer(name: str) -> str:
    """'root' (dfq/__init__.py), 'leaf' or 'primitive' (modules directly in dfq/), or the sub-package's name."""
    parts = name.split(".")
    if len(parts) == 1:
        return "root"
    if (ROOT / "dfq" / f"{parts[1]}.py").is_file():
        return "leaf" if name in LEAF_PRIMITIVES else "primitive"
    return parts[1]


def allowed(src: str, dst: str) -> bool:
    a, b = layer(src), layer(dst)
    if a == "root" or a in TOP or a == b:
        return True
    if a == "leaf":
        return False
    if a == "primitive":
        return b == "leaf"
    return b in ("leaf", "primitive") or b in ALLOWED_PACKAGES.get(a, ())


def test_every_dfq_package_has_a_layer():
    pkgs = {layer(m) for m in modules()} - {"root", "leaf", "primitive"}
    unknown = sorted(pkgs - set(ALLOWED_PACKAGES) - TOP)
    if unknown:
        pytest.fail(
            f"dfq sub-packages with no place in the layers (add them to ALLOWED_PACKAGES): {unknown}", pytrace=False
        )


def test_layers_contract():
    """Every import in dfq (module or function level) goes down the layers or stays in its own package."""
    bad = [
        f"{a} imports {b} (dfq/{a.replace('.', '/')}, line {line})"
        for (a, b), line in sorted(edges().items())
        if not allowed(a, b)
    ]
    for name, path in modules().items():
        bad += [
            f"{name} imports {cands[-1]} (line {line})"
            for cands, line, _ in imports(name, path)
            if cands[-1].split(".")[0] in OUTSIDE
        ]
    if bad:
        pytest.fail("imports against the layers:\n" + "\n".join(bad), pytrace=False)


def test_no_import_cycle():
    graph = defaultdict(set)
    for a, b in edges(lazy=False):
        graph[a].add(b)
    found = cycles(dict(graph))
    if found:
        pytest.fail("import cycles among dfq modules:\n" + "\n".join(" -> ".join(c) for c in found), pytrace=False)


def test_no_function_level_import_between_dfq_modules():
    """A dfq module imports the dfq modules it uses at the top, where the graph is visible (only heavy optional
    third-party packages may be imported inside a function)."""
    lazy = [f"{a} imports {b} inside a function (line {line})" for (a, b), line in sorted(edges(lazy=True).items())]
    if lazy:
        pytest.fail("function-level imports between dfq modules:\n" + "\n".join(lazy), pytrace=False)


def test_graph_reader_on_a_hand_made_package(tmp_path):
    """The reader itself: edges at module and function level, relative imports, a cycle and the levels."""
    pkg = tmp_path / "dfq"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "io.py": "import os\n",
        "a.py": "from dfq import io\nfrom dfq.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from . import c\ndef f():\n    from dfq.a import x\n",
        "sub/c.py": "from ..io import save\nimport dfq.sub.b\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    assert edges(tmp_path, lazy=False) == {
        ("dfq.a", "dfq.io"): 1,
        ("dfq.a", "dfq.sub.b"): 2,
        ("dfq.sub.b", "dfq.sub.c"): 1,
        ("dfq.sub.c", "dfq.io"): 1,
        ("dfq.sub.c", "dfq.sub.b"): 2,
    }
    assert edges(tmp_path, lazy=True) == {("dfq.sub.b", "dfq.a"): 3}
    graph = defaultdict(set)
    for a, b in edges(tmp_path, lazy=False):
        graph[a].add(b)
    assert cycles({**{m: set() for m in modules(tmp_path)}, **graph}) == [["dfq.sub.b", "dfq.sub.c", "dfq.sub.b"]]
    assert levels({"x": {"y"}, "y": {"z"}, "z": set()}) == 3 and levels({"x": {"y"}, "y": {"x"}}) == 1


# ---------------------------------------------------------------- dvc.yaml's code deps


CODE_TOPS = ("dfq", "stages", "cli", "bench")
LAYER_ORDER = ["fp32", "generation", "quant", "deploy", "pipeline"]


def _is_code(dep: str) -> bool:
    return dep.endswith(".py") and dep.split("/")[0] in CODE_TOPS


def stage_code_deps(text: str) -> dict[str, tuple[str, list[str]]]:
    """dvc.yaml stage -> (its script's module, the .py files of dfq/, stages/, cli/, bench/ in its deps)."""
    out = {}
    for stage, spec in yaml.safe_load(text)["stages"].items():
        spec = spec.get("do", spec)  # foreach: ... do: {cmd, deps}
        cmd = " ".join(spec["cmd"]) if isinstance(spec["cmd"], list) else spec["cmd"]
        m = re.search(r"python -m (stages\.\w+)", cmd)
        assert m, f"stage {stage}: cmd {cmd!r} does not run python -m stages.<name>"
        out[stage] = (m.group(1), [d for d in spec.get("deps", []) if isinstance(d, str) and _is_code(d)])
    return out


def dvc_deps_problems(text: str) -> list[str]:
    """Per stage, the files of its script's import closure missing in its deps, and the code deps not in it."""
    bad = []
    for stage, (module, deps) in stage_code_deps(text).items():
        need = stage_code(module)
        missing, stale = [f for f in need if f not in deps], [f for f in deps if f not in need]
        if missing:
            bad.append(f"{stage} ({module}): missing in deps: {', '.join(missing)}")
        if stale:
            bad.append(f"{stage} ({module}): stale in deps (not imported): {', '.join(stale)}")
    return bad


def _dep_order(path: str, script: str):
    """The script, stages/_common.py, stages/__init__.py, the primitives, then dfq's packages layer by layer."""
    parts = path.split("/")
    if parts[0] != "dfq":
        return (0, {script: 0, "stages/_common.py": 1, "stages/__init__.py": 2}.get(path, 3), path)
    if len(parts) == 2:
        return (1, parts[1] != "__init__.py", 0, path)
    rank = LAYER_ORDER.index(parts[1]) if parts[1] in LAYER_ORDER else len(LAYER_ORDER)
    return (2, rank, parts[-1] != "__init__.py", path)


def rewrite_dvc_deps(text: str) -> str:
    """dvc.yaml with each stage's code deps replaced by its script's import closure, at the top of its deps list (code
    deps come first in this file); every other line, data deps and comments included, unchanged."""
    scripts = {stage: module for stage, (module, _) in stage_code_deps(text).items()}
    out, stage, indent, files = [], None, None, []  # indent: of the current deps: key (None outside); files: to add
    for line in text.splitlines(keepends=True):
        head = re.match(r"^  ([\w-]+):", line)
        if head and head.group(1) in scripts:
            stage, indent = head.group(1), None
        item = re.match(r"^(\s+)- ([^#]*?)\s*(#.*)?$", line)
        in_deps = indent is not None and item is not None and len(item.group(1)) > indent
        indent = indent if in_deps else None
        if in_deps:
            if files:  # the list's first code dep (or first dep): the closure goes here
                out += [f"{item.group(1)}- {f}\n" for f in files]
                files = []
            if _is_code(item.group(2)):
                continue
        deps = re.match(r"^(\s+)deps:\s*$", line)
        if deps and stage:
            script = scripts[stage].replace(".", "/") + ".py"
            indent, files = len(deps.group(1)), sorted(stage_code(scripts[stage]), key=lambda f: _dep_order(f, script))
        out.append(line)
    return "".join(out)


def test_dvc_code_deps_are_the_import_closure():
    """Each stage's .py deps are exactly code_files(its script): a missing one would let DVC skip a stage whose code
    changed, a stale one reruns it for nothing."""
    bad = dvc_deps_problems((ROOT / "dvc.yaml").read_text())
    if bad:
        msg = (
            "dvc.yaml's code deps differ from the stages' import closures (python -m tests.test_architecture --fix-dvc)"
        )
        pytest.fail(msg + ":\n" + "\n".join(bad), pytrace=False)


def test_rewrite_dvc_deps_changes_only_the_code_deps():
    text = (ROOT / "dvc.yaml").read_text()
    new = rewrite_dvc_deps(text)
    assert not dvc_deps_problems(new) and rewrite_dvc_deps(new) == new

    def rest(t):
        return [line for line in t.splitlines() if not re.match(r"^\s+- (dfq|stages|cli|bench)/\S*\.py\s*$", line)]

    assert rest(new) == rest(text)


def dvc_stage_names(root: Path = ROOT) -> set[str]:
    """The names of the stages dvc.yaml defines under params.yaml (matrix entries expanded), as DVC reads them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.name for stage in repo.index.stages}


def stale_lock_entries(root: Path = ROOT) -> list[str]:
    """dvc.lock's stage entries that no stage of dvc.yaml has (left by renamed or dropped matrix entries)."""
    lock = yaml.load((root / "dvc.lock").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return sorted(set(lock.get("stages", {})) - dvc_stage_names(root))


def prune_lock(root: Path = ROOT) -> list[str]:
    """Remove the stale entries from dvc.lock with DVC's own round-trip YAML (every other line as DVC wrote it)."""
    from dvc.utils.serialize import modify_yaml

    stale = stale_lock_entries(root)
    with modify_yaml(str(root / "dvc.lock")) as data:
        for name in stale:
            del data["stages"][name]
    return stale


def test_dvc_lock_holds_only_the_stages_of_dvc_yaml():
    """DVC rewrites the whole dvc.lock after every stage it runs (a round-trip YAML parse and dump, about 0.6 s
    per 100 KB on this 2-core machine): an entry of a stage that no longer exists costs that on every stage of every
    `dvc repro` and is read by nothing."""
    stale = stale_lock_entries()
    if stale:
        fix = "python -m tests.test_architecture --prune-lock"
        pytest.fail(
            f"dvc.lock: {len(stale)} entries of stages dvc.yaml does not define ({fix}): {', '.join(stale)}",
            pytrace=False,
        )


def test_dvc_reads_yaml_with_libyaml():
    """DVC parses dvc.yaml, dvc.lock and params.yaml with ruamel's safe loader, which runs libyaml's C parser
    when ruamel.yaml.clib is installed (requirements.txt): 0.23 s instead of 0.84 s for the default dvc.lock, about
    2 s of every DVC command. The loader DVC builds must be the C one and read the lock as the pure-Python one does."""
    from dvc.utils.serialize import parse_yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None, "ruamel.yaml.clib is not importable: pip install -r requirements.txt"
    assert YAML(typ="safe").Parser is CParser
    text = (ROOT / "dvc.lock").read_text()
    assert parse_yaml(text, "dvc.lock") == YAML(typ="safe", pure=True).load(text)


# ---------------------------------------------------------------- sizes and docstrings


def _sources() -> list[Path]:
    return sorted(p for top in ("dfq", "stages") for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def size_violations() -> list[str]:
    bad = []
    for path in _sources():
        rel, text = path.relative_to(ROOT).as_posix(), path.read_text()
        n = len(text.splitlines())
        limit = MAX_STAGE if rel.startswith("stages/") and not path.name.startswith("_") else MAX_MODULE
        if n > limit:
            bad.append(f"{rel}: {n} lines (max {limit})")
        for fn in _functions(ast.parse(text)):
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_FUNCTION:
                bad.append(f"{rel}:{fn.lineno} {fn.name}: {length} lines (max {MAX_FUNCTION})")
    return bad


def args_violations() -> list[str]:
    """Public module-level functions and methods of public classes, more than MAX_PARAMS parameters (self/cls not
    counted, *args/**kwargs not counted), without an ``Args:`` line in the docstring."""
    bad = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        defs = [(None, n) for n in tree.body]
        defs += [
            (c.name, n) for c in tree.body if isinstance(c, ast.ClassDef) and not c.name.startswith("_") for n in c.body
        ]
        for cls, fn in defs:
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name.startswith("_"):
                continue
            params = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)]
            if cls and params and params[0] in ("self", "cls"):
                params = params[1:]
            doc = ast.get_docstring(fn) or ""
            if len(params) > MAX_PARAMS and not any(line.strip() == "Args:" for line in doc.splitlines()):
                name = f"{cls}.{fn.name}" if cls else fn.name
                bad.append(
                    f"{path.relative_to(ROOT).as_posix()}:{fn.lineno} {name}: {len(params)} parameters, "
                    "no Args: section"
                )
    return bad


def test_sizes():
    bad = size_violations()
    if bad:
        pytest.fail("over the size limits:\n" + "\n".join(bad), pytrace=False)


def test_public_functions_with_many_parameters_document_them():
    bad = args_violations()
    if bad:
        pytest.fail(
            f"public functions with more than {MAX_PARAMS} parameters and no Args: section:\n" + "\n".join(bad),
            pytrace=False,
        )


if __name__ == "__main__":
    if sys.argv[1:] == ["--fix-dvc"]:  # rewrite dvc.yaml's code deps to the stages' import closures
        (ROOT / "dvc.yaml").write_text(rewrite_dvc_deps((ROOT / "dvc.yaml").read_text()))
    elif sys.argv[1:] == ["--prune-lock"]:  # drop dvc.lock's entries of stages dvc.yaml no longer defines
        print(f"removed {len(prune_lock())} stale entries from dvc.lock")
    else:  # python -m tests.test_architecture [ROOT]: the import graph's summary
        print(summary(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
