"""Structural invariants of the package: the "done" criteria of the module layout (see DESIGN.md).

Modules of at most 400 lines, one-way imports (no cycle between modules), a cheap ``import alpaca_lora``,
an unchanged public API, a docstring on every module. The package checked is the one imported here
(``alpaca_lora.__file__``), so these run against whichever checkout is on the path.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import alpaca_lora

PACKAGE = Path(alpaca_lora.__file__).resolve().parent
MAX_LINES = 400


def module_name(path: Path) -> str:
    """``alpaca_lora.train.recipe`` for .../alpaca_lora/train/recipe.py; a package's __init__ is the package."""
    parts = ["alpaca_lora", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_package_was_found():
    assert "alpaca_lora.config" in MODULES and len(MODULES) > 20, MODULES


def test_no_module_is_over_400_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    over = sorted(((n, name) for name, n in sizes.items() if n > MAX_LINES), reverse=True)
    assert not over, f"modules over {MAX_LINES} lines: " + ", ".join(f"{name} ({n})" for n, name in over)


def _target(name: str) -> str | None:
    """The package module ``name`` refers to: itself, or the longest enclosing module (for a name in it)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str) -> set[str]:
    """The package modules that module ``name`` imports anywhere (in functions and TYPE_CHECKING blocks too)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_target(alias.name) for alias in node.names if alias.name.startswith("alpaca_lora"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != "alpaca_lora" and not source.startswith("alpaca_lora."):
                continue
            for alias in node.names:  # `from alpaca_lora.pkg import mod` imports the submodule when it is one
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in MODULES else _target(source))
    found.discard(None)
    found.discard(name)
    return found  # type: ignore[return-value]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one concrete cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, c) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through the smallest module of ``component`` (breadth-first: a shortest one)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    assert graph["alpaca_lora.train.recipe"], "the import parser found no import in train/recipe.py"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between modules:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


# The layers of the package, lowest first: a module imports only from its own layer or lower ones.
LAYERS = [
    {"errors", "files", "config_checks", "config_file"},
    {"data"},
    {"config", "config_lora"},
    {"kernels"},
    {"model"},
    {"export"},
    {"inference", "train"},
    {"cli", "demo", "selfinstruct", "ui", "__init__", "__main__"},
]


def _layer(name: str) -> int:
    part = name.split(".")[1] if "." in name else "__init__"
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_imports_go_down_the_layers_only():
    """data -> config -> kernels -> model -> export -> inference/train -> cli/demo/ui, never back up."""
    modules = [module_name(p) for p in sorted(PACKAGE.rglob("*.py"))]
    upward = [f"{m} -> {t}" for m in modules for t in imports_of(m) if _layer(t) > _layer(m)]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_import_alpaca_lora_imports_neither_torch_nor_transformers():
    code = ("import json, sys, alpaca_lora; "
            "print(json.dumps([alpaca_lora.__file__, [m for m in ('torch', 'transformers') if m in sys.modules]]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE.parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    where, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(where).resolve().parent == PACKAGE
    assert heavy == [], f"'import alpaca_lora' imported {heavy}"


def test_every_public_name_resolves():
    for name in alpaca_lora.__all__:
        assert getattr(alpaca_lora, name) is not None, name


EMPTY = inspect.Parameter.empty
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
KW = inspect.Parameter.KEYWORD_ONLY
VAR_KW = inspect.Parameter.VAR_KEYWORD

# Read from the package at commit c948878: (name, kind, default) of every parameter, in order; since then
# generate() took chat_template= (conversations) and tokenize_conversation() was added.
SIGNATURES = {
    "finetune": [("base_model", POS, EMPTY), ("data", POS, EMPTY), ("output_dir", POS, "lora-alpaca"),
                 ("config", KW, None), ("overrides", VAR_KW, EMPTY)],
    "generate": [("model_or_dir", POS, EMPTY), ("instruction", POS, EMPTY), ("input", POS, None),
                 ("template", KW, None), ("max_new_tokens", KW, 128), ("do_sample", KW, False),
                 ("temperature", KW, None), ("top_p", KW, None), ("top_k", KW, None), ("num_beams", KW, 1),
                 ("repetition_penalty", KW, None), ("stream", KW, False), ("quantization", KW, None),
                 ("compute_dtype", KW, "auto"), ("base_model", KW, None), ("batch_size", KW, 8),
                 ("tokenizer", KW, None), ("chat_template", KW, None), ("gen_kwargs", VAR_KW, EMPTY)],
    "merge": [("adapter_dir", POS, EMPTY), ("output_dir", POS, EMPTY), ("base_model", KW, None),
              ("dtype", KW, "float16"), ("max_shard_size", KW, "2GB"), ("merge_into", KW, "auto"),
              ("allow_base_mismatch", KW, False), ("verify", KW, True)],
    "load_model": [("base_model", POS, EMPTY), ("quantization", POS, "nf4"), ("compute_dtype", POS, "auto"),
                   ("device", KW, "auto"), ("quant_storage", KW, None)],
    "estimate_memory": [("base_model", POS, EMPTY), ("overrides", VAR_KW, EMPTY)],
    "push_to_hub": [("folder", POS, EMPTY), ("repo_id", POS, EMPTY), ("token", KW, None), ("private", KW, True),
                    ("dry_run", KW, False), ("commit_message", KW, "Upload model exported with alpaca_lora")],
    "inspect_data": [("data", POS, EMPTY), ("base_model", POS, None), ("cutoff_len", KW, 512),
                     ("template", KW, "alpaca"), ("train_on_inputs", KW, False), ("add_eos_token", KW, True),
                     ("column_map", KW, None), ("data_format", KW, "auto"), ("chat_template", KW, None)],
    "load_instructions": [("source", POS, EMPTY), ("column_map", KW, None), ("skip_bad_records", KW, False)],
    "tokenize_instruction": [("record", POS, EMPTY), ("tokenizer", POS, EMPTY), ("template", POS, "alpaca"),
                             ("cutoff_len", POS, 512), ("train_on_inputs", POS, False), ("add_eos_token", POS, True)],
    "tokenize_conversation": [("messages", POS, EMPTY), ("tokenizer", POS, EMPTY), ("chat_template", KW, None),
                              ("cutoff_len", KW, 2048), ("train_on_inputs", KW, False), ("tools", KW, None)],
}


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_public_signature_is_unchanged(name):
    params = inspect.signature(getattr(alpaca_lora, name)).parameters.values()
    assert [(p.name, p.kind, p.default) for p in params] == SIGNATURES[name]


def _comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and every module, class and function docstring in ``path``."""
    source = path.read_text(encoding="utf-8")
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                found.append((node.body[0].lineno, doc))
    return found


def test_every_module_has_a_docstring():
    missing = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text("utf-8")))]
    assert not missing, f"modules without a module docstring: {missing}"


def test_no_comment_or_docstring_cites_design_mistakes():
    pattern = re.compile(r"DESIGN\s+mistake", re.IGNORECASE)
    hits = [f"{path.relative_to(PACKAGE.parent)}:{line + text[: m.start()].count(chr(10))}"
            for path in MODULES.values() for line, text in _comments_and_docstrings(path)
            for m in pattern.finditer(text)]
    assert not hits, f"comments or docstrings citing 'DESIGN mistake' (say the reason instead): {hits}"


def test_test_files_have_unique_names():
    """pytest imports test files by their base name (the tests have no packages): two alike fail collection."""
    names = [p.name for p in Path(__file__).resolve().parent.rglob("*.py") if p.name != "__init__.py"]
    assert not [n for n in set(names) if names.count(n) > 1], sorted(n for n in set(names) if names.count(n) > 1)
