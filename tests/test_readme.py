"""The README stays a front door: short, its layout names every module, its links and the docs' links resolve.

The layout rule. The README's "## Layout" section holds one fenced block, a tree: a line whose first word ends
in "/" is a folder, nested under the nearest folder line above it with less indentation (top-level folders,
at indentation 0, are folders of the repository root). Every bare ``name.py`` word on a line names a file of
that line's folder: the line's own folder when the line starts with one, otherwise the nearest folder line
above it with less indentation. So ``    models.py`` under ``  fp32/`` under ``dfq/`` names dfq/fp32/models.py,
and a folder line may list its files after its description (``stages/ ... data.py fp32.py``), continued on
more-indented lines.

Every ``*.py`` file under dfq/ (at any depth), stages/ and cli/ except ``__init__.py`` must be named, and every
named file must exist. The lists come from the file system, so adding a module without a README line fails.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 200
CHECKED = ("dfq", "stages", "cli")  # every module below these folders must be named in the layout
PY_WORD = re.compile(r"(?<![\w/.])([A-Za-z_]\w*\.py)\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def layout_block(text: str) -> list[str]:
    """The lines of the first fenced block after the '## Layout' heading."""
    section = text.split("\n## Layout\n", 1)
    assert len(section) == 2, "README.md has no '## Layout' section"
    body = section[1].split("\n## ", 1)[0]
    fences = body.split("```")
    assert len(fences) >= 3, "the Layout section has no fenced block"
    return fences[1].split("\n")[1:]  # drop the rest of the opening fence line


def named_files(lines: list[str]) -> set[str]:
    """Repository-relative paths the layout tree names, by the rule in the module docstring."""
    folders: list[tuple[int, str]] = []  # (indentation, path) of the folder lines above, innermost last
    named = set()
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        while folders and folders[-1][0] >= indent:
            folders.pop()
        first = line.split()[0]
        if first.endswith("/"):
            parent = folders[-1][1] if folders else ""
            folders.append((indent, parent + first))
        assert folders, f"layout line outside any folder: {line!r}"
        named.update(folders[-1][1] + name for name in PY_WORD.findall(line))
    return named


def modules_on_disk() -> set[str]:
    found = set()
    for top in CHECKED:
        for path in (ROOT / top).rglob("*.py"):
            if path.name != "__init__.py" and "__pycache__" not in path.parts:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; at most {MAX_LINES} (move detail to docs/)"


def test_layout_names_every_module():
    named = named_files(layout_block(README.read_text(encoding="utf-8")))
    missing = sorted(modules_on_disk() - named)
    assert not missing, f"README.md's Layout section does not name: {missing}"


def test_layout_names_only_existing_files():
    named = named_files(layout_block(README.read_text(encoding="utf-8")))
    absent = sorted(p for p in named if not (ROOT / p).is_file())
    assert not absent, f"README.md's Layout section names files that do not exist: {absent}"


def test_layout_rule_on_a_hand_made_tree():
    tree = ["a/  top", "  x.py  one", "  b/  sub: y.py", "    z.py  two", "c/  files: p.py", "      q.py r.py"]
    assert named_files(tree) == {"a/x.py", "a/b/y.py", "a/b/z.py", "c/p.py", "c/q.py", "c/r.py"}


def test_relative_links_resolve():
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code is not a link
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s), mailto and anchors within the page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"relative links to missing files: {broken}"
