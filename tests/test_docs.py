"""The documentation: the mkdocs site builds with --strict (so every link and anchor between
pages resolves), the README stays a short landing page whose links work on GitHub, and every
pointer into docs/design.md from the code names a section that exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_DESIGN_POINTER = re.compile(r"docs/design\.md#([A-Za-z0-9_-]+)")


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks."""
    return _FENCE.sub("", text)


def _anchors(md_file: Path) -> set[str]:
    """Heading ids as mkdocs (Python-Markdown's toc) makes them; for plain headings they
    equal GitHub's."""
    from markdown.extensions.toc import slugify

    return {slugify(h.replace("`", ""), "-") for h in _HEADING.findall(_prose(md_file.read_text()))}


def _relative_links(md_file: Path) -> list[str]:
    links = _LINK.findall(_prose(md_file.read_text()))
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_mkdocs_site_builds_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "design" / "index.html").is_file()


def test_readme_is_a_landing_page_with_working_links():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move details into docs/"
    links = _relative_links(README)
    assert links, "README.md should link into docs/"
    for link in links:
        path, _, anchor = link.partition("#")
        if not path:  # an anchor inside the README itself
            assert anchor in _anchors(README), f"README.md: no heading for #{anchor}"
            continue
        target = (ROOT / path).resolve()
        assert target.exists(), f"README.md links to {link}, which does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"README.md links to {link}: no such heading in {path}"


def test_design_pointers_name_existing_sections():
    anchors = _anchors(DOCS / "design.md")
    for section in ("architecture", "prompt-and-tokens", "attention-masks", "one-shot-sampling",
                    "training-sequence-and-loss", "evaluation-metric"):
        assert section in anchors
    missing = []
    for folder in ("src", "tests", "benchmarks", "scripts", "docs"):
        for f in (ROOT / folder).rglob("*"):
            if not f.is_file() or f.suffix not in {".py", ".toml", ".md", ".json", ".sh", ".txt"}:
                continue
            if "egg-info" in f.as_posix():
                continue
            for anchor in _DESIGN_POINTER.findall(f.read_text(errors="replace")):
                if anchor not in anchors:
                    missing.append(f"{f.relative_to(ROOT)}: docs/design.md#{anchor}")
    assert not missing, "pointers to sections that docs/design.md does not have:\n" + "\n".join(missing)


def test_no_references_to_the_old_spec_in_the_package():
    hits = [
        str(f.relative_to(ROOT))
        for f in (ROOT / "src" / "nxtrec").rglob("*")
        if f.is_file() and f.suffix in {".py", ".toml", ".json", ".html", ".js", ".md"}
        and "DESIGN.md" in f.read_text(errors="replace")
    ]
    assert not hits, f"files that still point to DESIGN.md instead of docs/design.md: {hits}"
