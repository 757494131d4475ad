"""The documentation stays true to the code: links resolve, the configuration reference lists exactly the keys
QuantConfig accepts, the environment table lists every variable the package reads, the README stays short, and the
command blocks marked `<!-- test_docs: run -->` run as written (about 10 s: each is a fresh interpreter)."""

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ds_quant import config as config_module
from ds_quant.config import QuantConfig
from ds_quant.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").rglob("*.md")])
RUN_MARK = "<!-- test_docs: run -->"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def prose(path: Path) -> str:
    """The page without its fenced code blocks (a link or heading inside code is not one)."""
    return FENCE.sub("", text(path))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", prose(path), re.M)}


def test_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    for page in ("docs/getting-started.md", "docs/configuration.md", "docs/guides/launching.md",
                 "docs/guides/checkpoints.md", "docs/guides/kv-cache-and-attention.md", "docs/guides/accuracy.md",
                 "docs/reference/cli.md", "docs/reference/environment.md", "docs/reference/errors.md",
                 "docs/reference/coverage.md", "docs/reference/formats.md", "docs/results/performance.md",
                 "docs/results/accuracy.md", "docs/development.md", "bench/README.md"):
        assert page in names, f"{page} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_existing_files_and_headings(page):
    bad = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_readme_is_at_most_150_lines():
    n = len(text(ROOT / "README.md").splitlines())
    assert n <= 150, f"README.md has {n} lines; move detail into docs/ and link it"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_heading_names_a_module_path(page):
    bad = [h for h in re.findall(r"^#+\s+(.*)$", prose(page), re.M) if re.search(r"ds_quant[./]\w|\w\.py\b", h)]
    assert not bad, f"{page.relative_to(ROOT)}: headings name module paths (say what the user does instead): {bad}"


# -- configuration keys ---------------------------------------------------------------------------------------
def documented_keys() -> set[str]:
    """The backticked names in the first column of the tables under '## Keys' of docs/configuration.md."""
    page = prose(ROOT / "docs" / "configuration.md")
    section = page.split("\n## Keys\n", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and not set(cells[1].strip()) <= set("-"):
            keys.update(re.findall(r"`([a-z_][a-z0-9_.]*)`", cells[1]))
    return keys


def accepted_subkeys(key: str) -> list[str] | None:
    """For a key whose value is an object: the sub-keys QuantConfig accepts, from its error for an unknown one."""
    try:
        QuantConfig.from_dict({"method": "HOOKS", key: {"no_such_key": 1}})
    except ConfigError as e:
        m = re.search(rf"unknown key '{re.escape(key)}\.no_such_key'.*; accepted: ([\w, ]+)$", str(e))
        return [k.strip() for k in m.group(1).split(",")] if m else None
    return None


LEGACY = {"whitelist": "allowlist", "blacklist": "blocklist"}  # HQT's old names, accepted as the new ones


def test_every_documented_config_key_exists_and_every_accepted_key_is_documented():
    documented, accepted = documented_keys(), set(config_module._KEYS)
    assert {"method", "mode", "scale_method"} <= documented, "the key table of docs/configuration.md was not found"
    nested = {k: sub for k in accepted if (sub := accepted_subkeys(k))}
    assert {"scale_params", "gptq", "allowlist"} <= set(nested), nested  # the probe itself works
    accepted_all = accepted | {f"{k}.{s}" for k, subs in nested.items() for s in subs}
    for old, new in LEGACY.items():  # documented legacy names must load as the new key
        assert QuantConfig.from_dict({"method": "HOOKS", old: {}}) == QuantConfig.from_dict({"method": "HOOKS", new: {}})
    unknown = documented - accepted_all - set(LEGACY)
    assert not unknown, f"docs/configuration.md documents keys QuantConfig does not accept: {sorted(unknown)}"
    missing = accepted_all - documented
    assert not missing, f"config keys QuantConfig accepts but docs/configuration.md does not document: {sorted(missing)}"


# -- environment variables ------------------------------------------------------------------------------------
ENV_NAMES = {"environ", "env", "os.environ"}


def _is_env(node: ast.AST) -> bool:
    return ast.unparse(node) in ENV_NAMES


def _upper(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", node.value):
        return node.value
    return None


def variables_read(path: Path) -> set[str]:
    """Environment variables a Python file reads: `env.get("X")`, `os.getenv("X")`, `env["X"]`, `"X" in env`,
    every DS_QUANT_* / QUANT_* name, and the names listed in module constants named *_VARS or *_ENV / ENV_VAR."""
    found = set()
    for node in ast.walk(ast.parse(text(path))):
        if isinstance(node, ast.Call) and node.args and (name := _upper(node.args[0])):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "get" and _is_env(f.value)) or ast.unparse(f).endswith("getenv"):
                found.add(name)
        elif isinstance(node, ast.Subscript) and _is_env(node.value) and (name := _upper(node.slice)):
            found.add(name)
        elif isinstance(node, ast.Compare) and any(_is_env(c) for c in node.comparators) and (name := _upper(node.left)):
            found.add(name)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and re.search(r"(_VARS|_ENV|ENV_VAR)$", t.id)
                                                  for t in node.targets):
            found.update(n for c in ast.walk(node.value) if (n := _upper(c)))
        elif (name := _upper(node)) and re.match(r"(DS_QUANT|QUANT)_", name):
            found.add(name)
    return found


def test_every_environment_variable_read_is_in_the_environment_table():
    read = {}
    for path in [*sorted((ROOT / "ds_quant").rglob("*.py")), *sorted((ROOT / "launch").glob("*.py"))]:
        for name in variables_read(path):
            read.setdefault(name, path.relative_to(ROOT).as_posix())
    for path in sorted((ROOT / "launch").glob("*.sh")):  # ${NAME:-default}
        for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", text(path)):
            read.setdefault(name, path.relative_to(ROOT).as_posix())
    assert {"QUANT_CONFIG", "DS_QUANT_CPU_BACKEND", "RANK"} <= set(read), read  # the scan itself works
    table = prose(ROOT / "docs" / "reference" / "environment.md")
    rows = "\n".join(line.split("|")[1] for line in table.splitlines() if line.startswith("| `"))
    listed = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", rows))
    missing = {name: where for name, where in read.items() if name not in listed}
    assert not missing, f"read but not in docs/reference/environment.md's table: {missing}"


# -- commands that must run as written ------------------------------------------------------------------------
def marked_commands() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for block in re.findall(re.escape(RUN_MARK) + r"\s*\n```bash\n(.*?)\n```", text(page), re.S):
            out += [(page.relative_to(ROOT).as_posix(), line.strip()) for line in block.splitlines() if line.strip()]
    return out


def test_the_marked_commands_include_the_entry_points():
    commands = {c for _, c in marked_commands()}
    assert {"ds-quant --help", "python -m ds_quant.run --help"} <= commands, commands


@pytest.mark.parametrize("page,command", marked_commands())
def test_marked_command_runs(page, command):
    argv = shlex.split(command)
    if argv[0] == "ds-quant":  # the console script is the venv's; run this checkout's code with this interpreter
        argv = [sys.executable, "-m", "ds_quant.cli", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("QUANT_CONFIG", None)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{page}: `{command}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
