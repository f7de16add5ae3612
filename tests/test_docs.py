"""Documentation: every relative link in README.md and docs/*.md points to a file inside the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links and images in ``text`` that are not URLs or in-page anchors."""
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def test_link_parser_finds_links() -> None:
    text = "see [a](docs/a.md#x), ![p](img.png), [w](https://x.org) and [h](#top)"
    assert relative_links(text) == ["docs/a.md", "img.png"]


def test_semantics_doc_exists_and_is_linked() -> None:
    assert (ROOT / "docs" / "semantics.md").is_file()
    assert "docs/semantics.md" in relative_links((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_stay_in_repo(doc: Path) -> None:
    bad = []
    for target in relative_links(doc.read_text(encoding="utf-8")):
        path = (doc.parent / target).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            bad.append(target)
    assert not bad, f"{doc.name}: links that leave the repository or name no file: {bad}"


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def test_readme_support_tables_are_the_registry() -> None:
    """The README's supported and refused tables are what pruneattn.patch.registry says (regenerate them
    with ``readme_table()`` / ``vision_language_table()`` / ``refused_table()`` after changing the registry)."""
    from pruneattn.patch import registry

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _between(text, "checked by tests/test_docs.py -->", "<!-- end of supported families -->") == (
        registry.readme_table()
    )
    vlm = text.split("<!-- supported vision-language models:", 1)[1]
    assert _between(vlm, "-->", "<!-- end of supported vision-language models -->") == registry.vision_language_table()
    refused = text.split("<!-- refused classes:", 1)[1]
    assert _between(refused, "-->", "<!-- end of refused classes -->") == registry.refused_table()
