"""The layer rules of the data flow, read from the source's import statements.

A stage may use the stages before it and the shared value types, never the other way round:
the pipeline does not know the SMTP front, notify does not know the relay, the queue stores
plain records (no policy or action types), the file-format sniffers are a leaf.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mailguard"


def imports_of(path: Path) -> set[str]:
    """Every mailguard module a file imports, including under TYPE_CHECKING."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "mailguard" or m.startswith("mailguard.")}


def files(where: str) -> list[Path]:
    p = PKG / where
    return sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]


RULES = [
    # (files, forbidden module prefixes, why)
    ("pipeline", ("mailguard.smtp", "mailguard.server", "mailguard.app"), "front-agnostic"),
    ("notify", ("mailguard.relay", "mailguard.queue", "mailguard.pipeline"), "renders only"),
    ("queue", ("mailguard.policy", "mailguard.actions", "mailguard.checks"), "plain records"),
    ("formats", ("mailguard.checks", "mailguard.actions", "mailguard.message"), "a leaf"),
    ("checks", ("mailguard.actions", "mailguard.queue", "mailguard.relay"), "pure"),
    ("summary", ("mailguard.",), "plain data"),
    ("gate", ("mailguard.",), "plain data"),
]


@pytest.mark.parametrize(("where", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_layer_rule(where: str, forbidden: tuple[str, ...], why: str) -> None:
    bad = {
        f"{f.relative_to(PKG)} imports {m}"
        for f in files(where)
        for m in imports_of(f)
        if m.startswith(forbidden)
    }
    assert not bad, f"{where} must stay {why}: " + "; ".join(sorted(bad))


def test_no_importlib_fallbacks() -> None:
    """Modules import what they use; nothing probes for an optional sibling at run time."""
    offenders = [
        str(f.relative_to(PKG))
        for f in PKG.rglob("*.py")
        if "importlib.import_module" in f.read_text()
    ]
    assert offenders == []
