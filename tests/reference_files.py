"""The measured reference files of ../shared/reference/ (beside the checkout, as CI lays it, or inside it)."""
from __future__ import annotations

import json
from pathlib import Path


def load_reference(name: str) -> dict:
    """`shared/reference/NAME` parsed as JSON; FileNotFoundError naming it when neither place has it."""
    for base in Path(__file__).resolve().parents[1:3]:
        path = base / "shared" / "reference" / name
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"shared/reference/{name} not found beside or inside the checkout")
