"""The README stays a front door and the docs stay inside the repository.

- README.md is at most 250 lines, and its Python example runs;
- no tracked file points at the spec or papers outside the repository (a clone has none;
  the specification lives in docs/csa-spec.md);
- every relative link in README.md and docs/*.md names a file of the repository, and every
  ``#anchor`` into a markdown page names one of its headings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

# Built from pieces so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared/" + "spec/", "shared/" + "papers/")

# Directories a walk of an untracked tree (no git) leaves out: build outputs and environments.
_UNTRACKED_DIRS = {".git", ".venv", "build", "runs", "__pycache__", ".pytest_cache",
                   ".hypothesis", ".ruff_cache", "dist"}

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _repository_files() -> list[Path]:
    """The tracked files (``git ls-files``); without git, every file outside build outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in _UNTRACKED_DIRS]
            files.extend(Path(dirpath) / f for f in filenames)
        return files


def _links(page: Path) -> list[str]:
    """Link targets of a markdown page, outside fenced code blocks and code spans."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", page.read_text(encoding="utf-8")))
    return _LINK.findall(text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text,
                                                       re.MULTILINE)}


def _relative_targets(page: Path) -> list[tuple[str, Path, str]]:
    """``(link, resolved path, anchor)`` for each relative link of ``page``."""
    found = []
    for link in _links(page):
        if _EXTERNAL.match(link) or link.startswith("#"):
            continue
        path, _, anchor = link.partition("#")
        found.append((link, (page.parent / path).resolve(), anchor))
    return found


def test_readme_is_at_most_250_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} and move "
        "depth into docs/")


def test_readme_commands_are_the_ones_ci_and_users_run():
    """The README's test command is the one .ci/run executes, and the train command is there."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert ci, ".ci/run runs no command"
    assert ci[-1] in readme, f"README.md does not show the command .ci/run runs: {ci[-1]}"
    assert "bash scripts/bootstrap.sh && .venv/bin/qcs train" in readme


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert blocks, "README.md has no ```python example"
    pytest.importorskip("qcs_ext._C", reason="the fused kernels are not built")
    run = subprocess.run([sys.executable, "-c", blocks[0]], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, f"the README's example failed:\n{run.stderr}"


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for path in _repository_files():
        if not path.is_file():
            continue
        data = path.read_bytes()
        for pattern in OUTSIDE:
            if pattern.encode() in data:
                line = data[: data.index(pattern.encode())].count(b"\n") + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {pattern}")
    assert not offenders, (
        "these files point outside the repository (a clone has no such directory; cite "
        "docs/csa-spec.md or docs/models.md instead):\n" + "\n".join(offenders))


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_name_existing_files(page):
    missing = [link for link, target, _ in _relative_targets(page) if not target.exists()]
    outside = [link for link, target, _ in _relative_targets(page)
               if not target.is_relative_to(ROOT)]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
    assert not outside, f"{page.relative_to(ROOT)} links outside the repository: {outside}"


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_anchors_name_existing_headings(page):
    wrong = []
    for link, target, anchor in _relative_targets(page):
        if (anchor and target.suffix == ".md" and target.is_file()
                and _slug(anchor) not in _anchors(target)):
            wrong.append(link)
    for link in _links(page):
        if link.startswith("#") and _slug(link[1:]) not in _anchors(page):
            wrong.append(link)
    assert not wrong, f"{page.relative_to(ROOT)} links to headings that do not exist: {wrong}"


def test_the_link_checks_can_fail(tmp_path):
    """The helpers above find a broken link, a bad anchor and an outside pointer."""
    (tmp_path / "a.md").write_text("# Title\n\n[x](b.md) [y](a.md#nope) [z](a.md#title)\n"
                                   "`[not](a link.md)`\n```\n[nor](this.md)\n```\n")
    targets = _relative_targets(tmp_path / "a.md")
    assert [link for link, _, _ in targets] == ["b.md", "a.md#nope", "a.md#title"]
    assert not targets[0][1].exists()
    assert _anchors(tmp_path / "a.md") == {"title"}
    assert _slug("Fault injection: killing training") == "fault-injection-killing-training"
