"""The user docs hold: every path they name exists in the repository, every relative link resolves, and the
configuration reference is what the settings models generate."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("router/", "probes/", "docs/", "research/", "tests/", "loadtest/", "scripts/", "deploy/", "artifacts/", "data/",
       "examples/", ".ci/", "config.yaml", "docker-compose.", "Dockerfile", "Makefile", "pyproject.toml",
       ".env.example")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CODE = re.compile(r"`([^`\s]+)`")
"""Paths the docs name that another branch of the same change brings (#37: the GSM8K training split in data/),
checked like every other path once they exist. Remove an entry once it is on main."""


def user_docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _named_paths(text: str) -> set[str]:
    paths = set()
    for token in CODE.findall(text):
        token = token.rstrip(".,:;")
        if token.startswith(TOP) and not re.search(r"[<>*{}$|\[\]]|\.\.\.|…", token):
            paths.add(token.split(":")[0])  # file:line, file:function
    return paths


@pytest.mark.parametrize("doc", user_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_and_link_in_the_user_docs_exists(doc: Path) -> None:
    text = doc.read_text()
    missing = [p for p in sorted(_named_paths(text)) if not (ROOT / p).exists()]
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        if not (doc.parent / target).exists():
            missing.append(f"link {target}")
    assert not missing, f"{doc.relative_to(ROOT)} names what does not exist: {', '.join(missing)}"


def test_the_configuration_reference_is_generated_from_the_settings() -> None:
    from router.config_doc import reference

    path = ROOT / "docs" / "reference" / "configuration.md"
    assert path.read_text() == reference(), "regenerate it: python -m router config-reference --out " + str(
        path.relative_to(ROOT))
