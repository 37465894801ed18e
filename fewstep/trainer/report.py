"""What the evaluate stages write: metrics into manifests, and sections of `docs/MODEL_CARD.md`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewstep.models.checkpoint import read_manifest, write_json_atomic


def update_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    """Merge `metrics` into the manifest's `metrics` (the weights and their hashes are untouched)."""
    m = read_manifest(folder)
    m["metrics"] = {**m.get("metrics", {}), **metrics}
    write_json_atomic(folder / "manifest.json", m)


def set_manifest_field(folder: Path, key: str, value: Any) -> None:
    """Set one top-level field of the manifest (the weights and their hashes are untouched)."""
    m = read_manifest(folder)
    m[key] = value
    write_json_atomic(folder / "manifest.json", m)


def write_card_section(docs: Path, section: str, body: str) -> None:
    """Put `body` into `docs/MODEL_CARD.md` between `<!-- section -->` and `<!-- /section -->`,
    replacing what was there and leaving every other section alone (appended when new)."""
    card = docs / "MODEL_CARD.md"
    begin, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = card.read_text() if card.exists() else "# fewstep model card\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.mkdir(parents=True, exist_ok=True)
    card.write_text(text)
