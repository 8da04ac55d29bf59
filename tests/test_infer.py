"""Caption lists and output names of the inference CLI."""
from pathlib import Path

import pytest

from audioldm_dist.infer import read_prompts, safe_name


def test_both_list_forms_and_safe_unique_names(tmp_path: Path) -> None:
    path = tmp_path / "captions.lst"
    path.write_text("A dog barks\n../../etc/passwd|A cat meows\nA dog barks\nbirds|Birds sing at dawn\n")
    prompts = read_prompts(path)
    assert [p.caption for p in prompts] == ["A dog barks", "A cat meows", "A dog barks", "Birds sing at dawn"]
    assert [p.name for p in prompts] == ["A_dog_barks", "passwd", "A_dog_barks_2", "birds"]
    assert all("/" not in p.name and p.name for p in prompts)
    assert safe_name("../..") == "untitled"


@pytest.mark.parametrize("text,line", [("A dog barks\n\nA cat\n", 2), ("ok\nname|\n", 2), ("|caption only\n", 1)])
def test_bad_lines_are_reported_with_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "bad.lst"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{path}:{line}: "):
        read_prompts(path)
