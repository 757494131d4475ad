"""The package's layout rules (docs/development.md): wings import only from the wings below them, no import
cycles, imports of the package's own modules at module top, and `import ds_quant` pulls in no DeepSpeed."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ds_quant"
# High to low: a module may import only from its own wing or a lower one. Faces are the flat modules.
WINGS = ["face", "workflows", "layers", "files", "numerics", "config", "parallel", "base"]
BASE = {"errors", "log"}


def wing(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) > 1:
        return parts[0]
    if parts[0] in BASE:
        return "base"
    return "config" if parts[0] == "config" else "face"


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(PKG).with_suffix("").parts)
        out[name.removesuffix(".__init__") if name != "__init__" else ""] = p
    return out


def own_imports(mod: str, path: Path):
    """(target module, import node, at module top?) for every import of a ds_quant module."""
    mods = modules()
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        here = [p for p in here if p]
        base = here[: len(here) - (node.level - 1)] + ([node.module] if node.module else [])
        base = ".".join(base).replace("..", ".")
        for alias in node.names:
            full = f"{base}.{alias.name}" if base else alias.name
            target = full if full in mods else base
            if target:
                yield target, node, id(node) in top


def test_wings_import_only_downwards_and_nothing_imports_a_face_but_faces():
    bad = []
    for mod, path in modules().items():
        if not mod:
            continue
        for target, node, _ in own_imports(mod, path):
            if target == "" or target.split(".")[0] == mod.split(".")[0] and "." in mod:
                continue  # the package root, or the module's own wing
            w, t = WINGS.index(wing(mod)), WINGS.index(wing(target))
            if t < w or (t == w and wing(mod) == "base"):
                bad.append(f"{mod} -> {target} (line {node.lineno})")
    assert not bad, "imports running back up the wings:\n" + "\n".join(bad)


def test_nothing_in_the_package_imports_the_testing_module():
    """ds_quant.testing is for tests and benchmarks (it sits with the faces, so it may import any wing)."""
    users = [f"{m} (line {node.lineno})" for m, p in modules().items() for t, node, _ in own_imports(m, p)
             if t == "testing"]
    assert wing("testing") == "face" and not users, users


def test_no_module_imports_itself():
    selfish = [f"{m}:{node.lineno}" for m, p in modules().items() for t, node, _ in own_imports(m, p) if t == m and m]
    assert not selfish, selfish


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in own_imports(m, p) if t and t != m and not m.startswith(t + ".")}
             for m, p in modules().items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            visit(t)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles[:3]


def test_own_modules_are_imported_at_module_top():
    inner = [f"{m}:{node.lineno} -> {t}" for m, p in modules().items() for t, node, at_top in own_imports(m, p)
             if not at_top]
    assert len(inner) <= 10, inner


def test_no_module_is_over_600_lines_and_every_wing_says_what_it_is_for():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
    for w in WINGS[1:5] + ["parallel"]:
        doc = ast.get_docstring(ast.parse((PKG / w / "__init__.py").read_text()))
        assert doc and len(doc) > 40, w


def test_importing_ds_quant_imports_no_deepspeed_nor_transformers():
    code = ("import sys, ds_quant, ds_quant.cli, ds_quant.run; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'transformers', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
