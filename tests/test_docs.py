"""README.md and docs/: the links a reader follows resolve, and README's test command is CI's.

Pure text checks (no torch): a moved page or a renamed heading breaks a link silently otherwise.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "kernels" / "README.md", ROOT / "kernels" / "emulation" / "README.md",
         ROOT / "benchmarks" / "README.md"]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation other than '-' dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code is not links
    return [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for link in _relative_links(page):
        target, _, fragment = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif fragment and fragment not in _anchors(path):
            broken.append(f"{link} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_readme_links_every_docs_page():
    readme = ROOT / "README.md"
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _relative_links(readme)}
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"docs pages README does not link: {unlinked}"


def test_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^Test:\n\n```bash\n(.+?)\n```", readme, flags=re.M | re.S)
    assert block, "README has no 'Test:' command block"
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert block.group(1) in ci_lines, ".ci/run no longer runs README's test command verbatim"


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; the deep material belongs in docs/"
