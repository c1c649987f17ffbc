"""The package's layers: a module imports only from its own layer or those below, and only at module level."""

from __future__ import annotations

import ast
import os

import pytest

import easy_context

PKG = os.path.dirname(easy_context.__file__)
# Lowest first. The default world is a leaf any layer may build on; it imports no other layer.
LAYERS = ("world", "attention", "parallel", "hf", "memory", "train", "cepe", "eval")


def modules() -> list[str]:
    found = []
    for d, _, files in os.walk(PKG):
        found += [os.path.relpath(os.path.join(d, f), PKG) for f in files if f.endswith(".py")]
    return sorted(found)


def layer(path: str) -> str | None:
    """The layer a module path ("attention/ring.py") belongs to; None for the package's own __init__."""
    top = path.split(os.sep)[0]
    return top if top in LAYERS else None


def package_imports(path: str) -> list[tuple[str, int, bool]]:
    """(imported easy_context layer, line, at module level?) for each import of this package in ``path``."""
    tree = ast.parse(open(os.path.join(PKG, path)).read())
    pkg_parts = os.path.dirname(path).split(os.sep) if os.path.dirname(path) else []
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not target:  # "from . import x" in the package root
                    target = [node.names[0].name]
            elif node.module and node.module.split(".")[0] == "easy_context":
                target = node.module.split(".")[1:] or [node.names[0].name]
            else:
                continue
            found.append((target[0], node.lineno, id(node) in top_level))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "easy_context":
                    found.append((alias.name.split(".")[1], node.lineno, id(node) in top_level))
    return found


@pytest.mark.parametrize("path", [m for m in modules() if layer(m)])
def test_a_module_imports_only_its_own_layer_or_lower_ones(path):
    own = LAYERS.index(layer(path))
    for target, line, _ in package_imports(path):
        assert target in LAYERS, f"{path}:{line} imports easy_context.{target}, which belongs to no layer"
        if target == "world":
            continue
        assert layer(path) != "world", f"{path}:{line}: the default world imports no other layer"
        assert LAYERS.index(target) <= own, f"{path}:{line}: {layer(path)} imports the higher layer {target}"


@pytest.mark.parametrize("path", modules())
def test_no_package_import_hides_inside_a_function(path):
    hidden = [line for _, line, top in package_imports(path) if not top]
    assert not hidden, f"{path}: easy_context imports inside functions at lines {hidden}; import at the top"


def test_attention_imports_only_torch_and_the_standard_library():
    import sys

    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    for path in modules():
        if layer(path) != "attention":
            continue
        tree = ast.parse(open(os.path.join(PKG, path)).read())
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                assert name.split(".")[0] in allowed, f"{path}:{node.lineno} imports {name} at module level"
