"""Caption lists and the file names of generated clips, shared by `infer`, validation samples and `eval`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class Prompt:
    caption: str
    name: str
    line: int


def safe_name(text: str, *, max_length: int = 80) -> str:
    """A file stem from free text: letters, digits, `-` and `_` only, never empty, never a path."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:max_length]
    return stem or "untitled"


def unique_name(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem_2`, `stem_3`, ... : the first not in `taken`."""
    unique, suffix = stem, 1
    while unique in taken:
        suffix += 1
        unique = f"{stem}_{suffix}"
    return unique


def read_prompts(path: str | Path) -> list[Prompt]:
    """Parses a .lst file; an empty or malformed line is a ValueError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"caption list not found: {path}") from None
    prompts: list[Prompt] = []
    used: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            raise ValueError(f"{path}:{number}: empty line (expected a caption, or filename|caption)")
        if "|" in line:
            name, _, caption = line.partition("|")
            name, caption = Path(name.strip()).stem, caption.strip()
            if not name or not caption:
                raise ValueError(f"{path}:{number}: expected filename|caption, found {raw!r}")
            name = safe_name(name)
        else:
            caption, name = line, safe_name(line)
        unique = unique_name(name, used)
        used.add(unique)
        prompts.append(Prompt(caption=caption, name=unique, line=number))
    if not prompts:
        raise ValueError(f"{path}: no captions")
    return prompts
