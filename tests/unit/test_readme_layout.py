"""The README's layout section stays true to the tree: what it names exists, and what exists is named."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC_DIRS = (
    "operator/src",
    "trainer/src",
    "dev/assets/src",
    "dev/localcluster/src",
    "dev/devtools/src",
    "dev/testsupport/src",
    "dev/demo/src",
    "cli/src",
)


def _layout() -> dict[str, str]:
    """The layout block as {top-level folder: its text (continuation lines included)}."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Layout\n\n```\n(.*?)^```", readme, re.M | re.S)
    assert block, "README.md: no fenced block under '## Layout'"
    entries: dict[str, str] = {}
    folder = ""
    for line in block.group(1).splitlines():
        head = re.match(r"([\w.-]+)/\s", line)
        if head:
            folder = head.group(1)
            entries[folder] = ""
        assert folder, f"README.md layout: a line before the first folder: {line!r}"
        entries[folder] += line + "\n"
    return entries


def _packages() -> dict[str, Path]:
    """Every Python package under the four source roots, by dotted name."""
    found: dict[str, Path] = {}
    for src in SRC_DIRS:
        for init in sorted((ROOT / src).rglob("__init__.py")):
            found[".".join(init.parent.relative_to(ROOT / src).parts)] = init.parent
    return found


def _tracked_top_level_folders() -> set[str]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return {f.split("/", 1)[0] for f in files.splitlines() if "/" in f and not f.startswith(".")}


def test_every_named_folder_package_and_module_exists() -> None:
    layout = _layout()
    text = "".join(layout.values())
    for folder in layout:
        assert (ROOT / folder).is_dir(), f"README.md layout names {folder}/, which does not exist"
    packages = _packages()
    for name in set(re.findall(r"\bfinetune_\w+", text)):
        assert name in packages, f"README.md layout names the package {name}, which does not exist"
    modules = {p.name for src in SRC_DIRS for p in (ROOT / src).rglob("*.py")}
    for module in set(re.findall(r"\b\w+\.py\b", text)):
        assert module in modules, f"README.md layout names {module}, which is no module under {', '.join(SRC_DIRS)}"
    for path in set(re.findall(r"(?<![\w./])(dev/[\w-]+)", text)):
        assert (ROOT / path).exists(), f"README.md layout names {path}, which does not exist"


def test_every_folder_package_and_test_folder_is_named() -> None:
    layout = _layout()
    text = "".join(layout.values())
    missing = _tracked_top_level_folders() - set(layout)
    assert not missing, f"README.md layout omits the top-level folder(s) {sorted(missing)}"
    for name, path in _packages().items():
        leaf = name.rsplit(".", 1)[-1]
        named = name in text if "." not in name else re.search(rf"\b{leaf}/", text)
        assert named, f"README.md layout omits the package {name} ({path.relative_to(ROOT)})"
    tests = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    for folder in tests:
        assert f"{folder}/" in layout.get("tests", ""), f"README.md layout omits tests/{folder}/"
