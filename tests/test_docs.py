"""Documentation: links stay in the repository, the README is a short guide that links every page, and the
model tables of docs/models.md (and the README's brief list) are what pruneattn.patch.registry says."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, ROOT / "CONTRIBUTING.md", *PAGES]
MAX_README_LINES = 350
# The README's sections, in order: a user guide, not a reference manual.
README_SECTIONS = ["Install", "Quick start", "Examples", "API", "Supported models", "Performance", "Links"]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# "planned" alone is a product word here (a processor plans a prompt's image tokens); plans of the project's are not.
_PLANNING = re.compile(
    r"\bTODO\b|\bFIXME\b|\bplanned (?:for|to)\b|\bnot yet\b|\bcoming soon\b|\bpart \d|\bissue\s*#?\d|\bphase \d", re.I
)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links and images in ``text`` that are not URLs or in-page anchors."""
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def between(text: str, start: str, end: str) -> str:
    """The text after the first ``start`` (a marker comment: after its ``-->``) up to ``end``, stripped."""
    after = text.split(start, 1)[1]
    if start.startswith("<!--") and not start.endswith("-->"):
        after = after.split("-->", 1)[1]
    return after.split(end, 1)[0].strip()


def test_link_parser_finds_links() -> None:
    text = "see [a](docs/a.md#x), ![p](img.png), [w](https://x.org) and [h](#top)"
    assert relative_links(text) == ["docs/a.md", "img.png"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_stay_in_repo(doc: Path) -> None:
    bad = []
    for target in relative_links(read(doc)):
        path = (doc.parent / target).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            bad.append(target)
    assert not bad, f"{doc.name}: links that leave the repository or name no file: {bad}"


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of ``text``: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_anchor_parser() -> None:
    assert anchors("# A b\n## `patch`, `unpatch`\n```\n# not a heading\n```\n") == {"a-b", "patch-unpatch"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_to_sections_find_them(doc: Path) -> None:
    bad = []
    for target in _LINK.findall(read(doc)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or "#" not in target:
            continue
        file, anchor = target.split("#", 1)
        page = (doc.parent / file).resolve() if file else doc
        if page.suffix == ".md" and anchor not in anchors(read(page)):
            bad.append(target)
    assert not bad, f"{doc.name}: links to sections that do not exist: {bad}"


def test_readme_is_a_short_guide_in_order() -> None:
    text = read(README)
    assert len(text.splitlines()) <= MAX_README_LINES
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections == README_SECTIONS, sections
    first_code = text.index("```")
    assert len(text[:first_code].split()) < 400, "the README says too much before its first command"


def test_readme_links_every_page() -> None:
    linked = {Path(t).resolve() for t in relative_links(read(README))}
    missing = [p.name for p in [*PAGES, ROOT / "CONTRIBUTING.md"] if p.resolve() not in linked]
    assert not missing, f"pages the README does not link: {missing}"


@pytest.mark.parametrize("doc", [README, ROOT / "CONTRIBUTING.md", *[p for p in PAGES if p.name != "semantics.md"]],
                         ids=lambda p: p.name)
def test_no_planning_words(doc: Path) -> None:
    found = _PLANNING.findall(read(doc))
    assert not found, f"{doc.name} speaks of plans, not of what the code does: {found}"


def test_models_page_tables_are_the_registry() -> None:
    """docs/models.md holds the supported, vision-language and refused tables as pruneattn.patch.registry
    writes them (regenerate them with ``readme_table()`` / ``vision_language_table()`` / ``refused_table()``
    after changing the registry)."""
    from pruneattn.patch import registry

    text = read(ROOT / "docs" / "models.md")
    assert between(text, "<!-- supported families:", "<!-- end of supported families -->") == registry.readme_table()
    assert between(text, "<!-- supported vision-language models:", "<!-- end of supported vision-language models -->") == (
        registry.vision_language_table())
    assert between(text, "<!-- refused classes:", "<!-- end of refused classes -->") == registry.refused_table()


_PREFIXES = ("Hugging Face ", "timm ", "open_clip ")
_README_ROWS = {"timm": "timm", "transformers": "Hugging Face transformers", "open_clip": "open_clip"}


def short_name(label: str) -> str:
    """A family's name without its library: ``"Hugging Face SigLIP vision"`` -> ``"SigLIP vision"``."""
    return next((label[len(p):] for p in _PREFIXES if label.startswith(p)), label)


def test_readme_lists_every_family_in_its_library_row() -> None:
    from pruneattn.patch import registry

    section = read(README).split("## Supported models", 1)[1].split("\n## ", 1)[0]
    rows = {cells[0]: cells[1] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| "))}
    for family in registry.FAMILIES:
        row = rows[_README_ROWS[family.library]]
        assert re.search(rf"(^|, ){re.escape(short_name(family.label))}( \(|,|$)", row), (family.label, row)
    for family in registry.VISION_LANGUAGE:
        assert short_name(family.label) in rows["vision-language (transformers)"].split(", "), family.label


def test_readme_names_no_class_the_registry_does_not_know() -> None:
    """The brief list holds no family that the registry has dropped."""
    from pruneattn.patch import registry

    section = read(README).split("## Supported models", 1)[1].split("\n## ", 1)[0]
    known = {re.sub(r" \([^)]*\)", "", short_name(f.label)) for f in (*registry.FAMILIES, *registry.VISION_LANGUAGE)}
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| library"):
            continue
        names = re.sub(r" \([^)]*\)", "", line.strip("|").split("|")[1]).split(", ")
        unknown = [n.strip() for n in names if n.strip() not in known]
        assert not unknown, unknown


def test_semantics_doc_exists_and_is_linked() -> None:
    assert (ROOT / "docs" / "semantics.md").is_file()
    assert "docs/semantics.md" in relative_links(read(README))


def test_readme_performance_table_is_a_measured_one() -> None:
    """Every row of the README's performance table is a row of docs/performance.md, where its run's date and
    conditions are (so that the two cannot drift apart)."""
    section = read(README).split("## Performance", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) >= 3
    measured = read(ROOT / "docs" / "performance.md").splitlines()
    assert [r for r in rows if r not in measured] == []
