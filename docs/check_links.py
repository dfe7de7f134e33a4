"""Check that every relative link in README.md and docs/*.md resolves.

A link resolves when its file exists and, if it names an anchor, the target
page has a heading with that GitHub-style anchor. Pages that other branches
add are listed in EXPECTED_MISSING until they land; empty it after the merge.

    python docs/check_links.py      # exit status 1 on a broken link
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_MISSING = {
    "docs/runtime.md",
    "docs/families.md",
    "docs/peft.md",
    "docs/perf-analyzer.md",
    "docs/scaling-out.md",
    "docs/benchmarks.md",
}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")
FENCE = re.compile(r"^\s*```")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to '-'."""
    found: set[str] = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        m = None if in_code else HEADING.match(line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).lower().replace("`", ""))
            found.add(text.replace(" ", "-"))
    return found


def links(page: Path) -> list[str]:
    """Link targets outside code blocks."""
    out: list[str] = []
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            out += LINK.findall(line)
    return out


def main() -> int:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken, pending = [], set()
    for page in pages:
        for target in links(page):
            if re.match(r"^[a-z]+://|^mailto:", target):
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.exists():
                (pending.add(rel) if rel in EXPECTED_MISSING else broken.append(f"{page.name}: {target} (no file)"))
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no heading with that anchor)")
    for line in broken:
        print(f"BROKEN  {line}")
    for rel in sorted(pending):
        print(f"pending {rel} (added by another branch)")
    print(f"{len(pages)} pages checked, {len(broken)} broken links, {len(pending)} expected-missing pages linked")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
