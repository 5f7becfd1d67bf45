"""The code's layout as the style notes promise it: packages named for the layers, each importing only the ones
below it; no import cycles; thin shells; one home per command."""

from __future__ import annotations

import ast
from pathlib import Path

from qwen_mlx.cli.main import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
# Where each top-level folder installs (pyproject's package-dir).
PACKAGES = {"qwen_mlx": "qwen_mlx", "convert": "qwen_mlx.converter", "webui": "qwen_mlx.webui"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its code (imports only for type checkers excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                    else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {t for t in targets if t in known and t != name}


# Which layers each part of the code may import. The library's layers, bottom up, then the public API (the
# package's __init__) and the front ends, which sit on top of all of them and share their command-line pieces
# through cli/.
BASE = {"base"}
LIBRARY = {"base", "model", "text", "store", "engine", "serving"}
MAY_IMPORT = {
    "base": BASE,
    "model": BASE | {"model"},
    "text": BASE | {"text"},
    "store": BASE | {"model", "text", "store"},
    "engine": BASE | {"model", "text", "store", "engine"},
    "serving": LIBRARY,
    "api": LIBRARY - {"serving"},
    "cli": LIBRARY | {"cli", "converter", "webui"},
    "converter": LIBRARY | {"converter"},
    "webui": LIBRARY | {"cli", "webui"},
}


def layer(module: str) -> str:
    """The layer a module belongs to: its package under qwen_mlx/, or base for the modules directly in it."""
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return "base" if parts[1] in ("errors", "files", "blas") else parts[1]


def test_every_package_imports_only_the_layers_below_it() -> None:
    found = modules()
    wrong = []
    for name, path in sorted(found.items()):
        own = layer(name)
        assert own in MAY_IMPORT, f"{name}: a module outside every layer; put it in one of {sorted(MAY_IMPORT)}"
        wrong += [f"{name} ({own}) imports {target} ({layer(target)})"
                  for target in sorted(imported(path, name, set(found))) if layer(target) not in MAY_IMPORT[own]]
    assert not wrong, "\n".join(wrong)


def test_the_base_is_only_the_shared_pieces() -> None:
    base = sorted(p.name for p in (ROOT / "qwen_mlx").glob("*.py"))
    assert set(base) <= {"__init__.py", "errors.py", "files.py", "blas.py"}, base


def test_no_module_imports_a_module_that_imports_it() -> None:
    found = modules()
    graph = {name: imported(path, name, set(found)) for name, path in found.items()}
    cycles = []

    def walk(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in done:
                walk(nxt, [*stack, nxt], done)
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            walk(name, [name], done)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_convert_holds_only_its_command() -> None:
    assert sorted(p.name for p in (ROOT / "convert").glob("*.py")) == ["__init__.py", "cli.py"]
    tree = ast.parse((ROOT / "convert" / "cli.py").read_text(encoding="utf-8"))
    functions = sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef))
    assert functions == ["add_parser", "run"]


def test_every_subcommand_has_one_home_with_the_same_two_functions() -> None:
    assert len({c.__name__ for c in COMMANDS}) == len(COMMANDS) == 13
    for command in COMMANDS:
        assert callable(command.add_parser) and callable(command.run), command.__name__
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(["generate", "chat", "cache-prompt", "convert", "webui", "serve", "bench",
                                          "eval", "info", "pull", "list", "ls", "rm", "run"])
    for name, sub_parser in sub.choices.items():
        assert sub_parser.get_default("func").__module__ in {c.__name__ for c in COMMANDS}, name


def test_the_runtime_imports_neither_mlx_lm_nor_transformers() -> None:
    """They are test and benchmark references only (the dev extra): a plain install must not need them."""
    import subprocess
    import sys

    code = ("import sys, qwen_mlx, qwen_mlx.cli, qwen_mlx.serving.app, qwen_mlx.webui.app, qwen_mlx.store.conversion; "
            "print(sorted(m for m in ('mlx_lm', 'transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
