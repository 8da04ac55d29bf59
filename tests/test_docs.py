"""The docs stay true to the code, checked without running anything (a few seconds).

- Every command line in a shell block of README.md or docs/*.md that runs one of our CLIs parses with that
  CLI's own argparse parser (`build_parser()` of its module): the flags exist, values convert, required
  ones are there. Doc notation: `[...]` marks optional parts (parsed as if given), `a|b` alternatives are
  passed as written, and a `...` token is a placeholder: after a flag it stands for its value, anywhere else
  for "the rest as above", and then only missing required arguments are forgiven.
- Every CLI (a module with `build_parser`) is shown in at least one shell block.
- Every repository path the docs name (in backticks, links or shell blocks) exists, `*` patterns match,
  and every link between the docs resolves, `#anchors` included (GitHub's heading slugs).
- The README starts with the two fresh-machine commands, and `.ci/run` runs that test command.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}

TOP_LEVEL = {"audioldm_dist", "shards", "launch", "configs", "benchmarks", "tests", "scripts", "docs", ".ci",
             "train.py", "setup.py", "pytest.ini", "README.md"}
"""A backticked or linked path whose first part is one of these is a repository path and must exist."""
PATH_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".sh", ".ini", ".txt"}

PACKAGE_MAINS = {"audioldm_dist.eval": "audioldm_dist/eval/cli.py"}
"""`python -m PACKAGE` → the module whose parser its __main__ uses."""
SCRIPT_PARSERS = {"train.py": "audioldm_dist/engine/trainer.py", "benchmarks/gpu_check.sh": "benchmarks/gpu_check.py",
                  "make-shards": "shards/cli.py", "encode-shards": "shards/encode_cli.py"}
"""Entry points whose parser lives in another file (console scripts, train.py, a shell wrapper that passes
its arguments on)."""
SCRIPTS_WITHOUT_PARSER = {"scripts/demo.sh": 1, "scripts/test.sh": None}
"""Shell scripts with no argparse: the most positional arguments they take (None: any, e.g. pytest's)."""


# --- reading the markdown ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    language: str
    text: str


def _split(doc: Path) -> tuple[list[Block], str]:
    """(fenced code blocks, the prose with the blocks blanked out)."""
    blocks, prose = [], []
    fence, language, start, body = None, "", 0, []
    for number, line in enumerate(doc.read_text().split("\n"), 1):
        opening = re.match(r"\s*(`{3,})\s*([\w+-]*)", line)
        if fence is None and opening:
            fence, language, start, body = opening.group(1), opening.group(2).lower(), number, []
            prose.append("")
        elif fence is not None and line.strip() == fence:
            blocks.append(Block(doc, start, language, "\n".join(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"{doc.name}:{start}: unclosed code fence"
    return blocks, "\n".join(prose)


def _code_spans(prose: str) -> list[str]:
    return [match.group(2).strip() for match in re.finditer(r"(`+)(.+?)(?<!`)\1(?!`)", prose, re.DOTALL)]


def _links(prose: str) -> list[str]:
    without_code = re.sub(r"(`+)(.+?)(?<!`)\1(?!`)", "", prose, flags=re.DOTALL)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", without_code)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → hyphens."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    _, prose = _split(doc)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.MULTILINE):
        slug, number = _slug(heading), 1
        while slug in anchors:
            slug, number = f"{_slug(heading)}-{number}", number + 1
        anchors.add(slug)
    return anchors


# --- command lines ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}: {self.text}"


def _commands(block: Block) -> list[Command]:
    commands, pending, first = [], "", 0
    for offset, line in enumerate(block.text.split("\n")):
        if not pending:
            first = block.line + 1 + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text and not text.startswith("#"):
            commands.append(Command(block.doc, first, text))
    return commands


def _shell_commands() -> list[Command]:
    return [command for doc in DOCS for block in _split(doc)[0] if block.language in SHELL_LANGUAGES
            for command in _commands(block)]


def _words(command: Command) -> tuple[list[str], bool]:
    """The argv as a user would type it with every optional part given, and whether a `...` stood for more
    arguments (then the command is a fragment)."""
    words, depth, fragment = [], 0, False
    for word in shlex.split(command.text, comments=True):
        while word.startswith("[") and len(word) > 1:
            word, depth = word[1:], depth + 1
        while word.endswith("]") and depth > 0:
            word, depth = word[:-1], depth - 1
        if word in ("", "[", "]"):
            continue
        if word == "...":
            if words and words[-1].startswith("-") and words[-1] != "--":
                words.append("PLACEHOLDER")
            else:
                fragment = True
            continue
        words.append(word)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value before the command
        words.pop(0)
    return words, fragment


def _invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """argv → (the entry point as a repository path or console script, its arguments); None: not ours."""
    head, rest = Path(words[0]).name, words[1:]
    if head in ("make-shards", "encode-shards"):
        return head, rest
    if head == "deepspeed":
        while rest and not rest[0].endswith(".py") and rest[0] != "--module":
            rest = rest[2:] if len(rest) > 1 and not rest[1].startswith("-") and not rest[1].endswith(".py") \
                else rest[1:]  # the launcher's own options (--num_gpus N, ...)
        if not rest:
            return None
        return (_module_file(rest[1]), rest[2:]) if rest[0] == "--module" else (rest[0], rest[1:])
    if head.startswith("python"):
        if rest[:1] == ["-m"]:
            module = rest[1]
            return (_module_file(module), rest[2:]) if module.split(".")[0] in ("audioldm_dist", "shards") else None
        return rest[0], rest[1:]
    if head == "bash":
        return rest[0], rest[1:]
    return None


def _module_file(module: str) -> str:
    if module in PACKAGE_MAINS:
        return PACKAGE_MAINS[module]
    return module.replace(".", "/") + ".py"


def _load(path: str) -> ModuleType:
    """The module of a repository .py file: by its package name when it has one, else from the file."""
    parts = Path(path).with_suffix("").parts
    if parts[0] in ("audioldm_dist", "shards", "launch"):
        return importlib.import_module(".".join(parts))
    name = "docs_cli_" + "_".join(parts)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class _ParseError(Exception):
    pass


def _parse(path: str, argv: list[str], *, fragment: bool) -> None:
    module = _load(SCRIPT_PARSERS.get(path, path))
    assert hasattr(module, "build_parser"), f"{path} has no build_parser(): add one, so its command line is tested"
    parser: argparse.ArgumentParser = module.build_parser()

    def error(message: str) -> None:
        raise _ParseError(message)

    parser.error = error  # argparse's documented hook; raise instead of printing usage and exiting
    argv = list(argv)
    while True:
        try:
            parser.parse_args(argv)
            return
        except _ParseError as failure:
            # A placeholder such as N or SECONDS where a number goes: try a number there, and parse again.
            placeholder = re.search(r"invalid \w+ value: '([A-Z][A-Z0-9_]*)'", str(failure))
            if placeholder and placeholder.group(1) in argv:
                argv[argv.index(placeholder.group(1))] = "1"
                continue
            missing = str(failure).startswith(("the following arguments are required", "one of the arguments"))
            if not (fragment and missing):
                raise AssertionError(f"{path} {' '.join(argv)}: {failure}") from None
            return


COMMANDS = _shell_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.doc.name}:{c.line}")
def test_shell_command_parses(command: Command) -> None:
    words, fragment = _words(command)
    invocation = _invocation(words)
    assert invocation is not None, f"{command}\nnot one of our CLIs: show it outside a shell block"
    path, argv = invocation
    assert path in SCRIPT_PARSERS or (ROOT / path).is_file(), f"{command}\n{path}: no such entry point"
    if path in SCRIPTS_WITHOUT_PARSER:
        most = SCRIPTS_WITHOUT_PARSER[path]
        assert most is None or len(argv) <= most, f"{command}\n{path} takes at most {most} argument(s)"
        return
    if path == "launch/slurm.py":
        assert "--" in argv, f"{command}\nlaunch/slurm.py needs `--` before train.py's arguments"
        at = argv.index("--")
        _parse(path, argv[:at], fragment=fragment)
        _parse("train.py", argv[at + 1:], fragment=fragment)
        return
    _parse(path, argv, fragment=fragment)


def test_every_cli_is_shown() -> None:
    """A module with a `build_parser` is a CLI, and a CLI the docs never show is one nobody finds."""
    clis = {str(path.relative_to(ROOT)) for folder in ("audioldm_dist", "shards", "launch", "benchmarks")
            for path in (ROOT / folder).rglob("*.py") if "\ndef build_parser(" in path.read_text()}
    shown = set()
    for command in COMMANDS:
        invocation = _invocation(_words(command)[0])
        if invocation is not None:
            shown.add(SCRIPT_PARSERS.get(invocation[0], invocation[0]))
            if invocation[0] == "launch/slurm.py":
                shown.add(SCRIPT_PARSERS["train.py"])
    assert clis - shown == set(), f"CLIs no shell block of README.md or docs/*.md shows: {sorted(clis - shown)}"


# --- python blocks ---------------------------------------------------------------------------------

def test_python_blocks_import_what_exists() -> None:
    for doc in DOCS:
        for block in _split(doc)[0]:
            if block.language != "python":
                continue
            for node in ast.walk(ast.parse(block.text)):
                if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in ("audioldm_dist", "shards"):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), \
                            f"{doc.name}:{block.line}: {node.module} has no {alias.name}"


# --- paths and links -------------------------------------------------------------------------------

def _exists(relative: str) -> bool:
    relative = relative.rstrip("/")
    if "*" in relative:
        return any(ROOT.glob(relative))
    return (ROOT / relative).exists()


def _repo_path(word: str) -> str | None:
    """The repository path a backticked word or command argument names, if it names one."""
    word = word.strip("\"'(),;:.").split("::")[0]
    if not word or any(mark in word for mark in "=${}<>|"):
        return None
    first = word.split("/")[0]
    if first in TOP_LEVEL and (word.endswith("/") or "*" in word or Path(word).suffix in PATH_SUFFIXES):
        return word
    if "/" in word and word.endswith(".py") and first not in ("..", "~") and not first.isupper():
        return word  # a .py named from elsewhere than the root: fails below, so that it is named from the root
    return None


def _named_paths(doc: Path) -> list[str]:
    blocks, prose = _split(doc)
    words = [word for span in _code_spans(prose) for word in span.split()]
    words += [word for block in blocks if block.language in SHELL_LANGUAGES for word in block.text.split()]
    return sorted({path for word in words if (path := _repo_path(word))})


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_named_paths_exist(doc: Path) -> None:
    missing = [path for path in _named_paths(doc) if not _exists(path)]
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist (from the repository root): {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_links_resolve(doc: Path) -> None:
    broken = []
    for target in _links(_split(doc)[1]):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists() or ROOT not in (linked, *linked.parents):
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no heading with that anchor in {linked.name})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(_split(ROOT / "README.md")[1])}
    assert set(DOCS[1:]) - linked == set(), "docs pages the README does not link to"


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    blocks, _ = _split(ROOT / "README.md")
    first = blocks[0]
    assert first.language == "bash"
    assert [line.split("#")[0].strip() for line in first.text.split("\n")] == ["bash scripts/demo.sh",
                                                                                "bash scripts/test.sh"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().split("\n")]
    assert any(line.startswith("bash scripts/test.sh") for line in ci), ".ci/run no longer runs the README's tests"


def test_the_checks_catch_what_they_are_for() -> None:
    """A wrong flag, a missing required argument, a missing path and a bad anchor are all caught."""
    with pytest.raises(AssertionError, match="unrecognized arguments"):
        _parse("shards/cli.py", ["--no-such-flag"], fragment=False)
    with pytest.raises(AssertionError, match="required"):
        _parse("train.py", ["--config", "configs/tiny.yaml"], fragment=False)
    _parse("train.py", ["--config", "configs/tiny.yaml"], fragment=True)
    _parse("train.py", ["--config", "C", "--deepspeed_config", "D", "--run-dir", "R", "--max-steps", "N"], fragment=False)
    with pytest.raises(AssertionError, match="invalid int value"):
        _parse("train.py", ["--config", "C", "--deepspeed_config", "D", "--run-dir", "R", "--max-steps", "many"],
               fragment=False)
    assert _words(Command(ROOT, 1, "python -m audioldm_dist.infer --config ... [--seed 0] [runs/a ...]"))[0] \
        == ["python", "-m", "audioldm_dist.infer", "--config", "PLACEHOLDER", "--seed", "0", "runs/a"]
    assert _repo_path("`models/unet.py`".strip("`")) == "models/unet.py" and not _exists("models/unet.py")
    assert _repo_path("shards/audiocaps/train") is None and _repo_path("RUN_DIR/report.html") is None
    assert _repo_path("shards") is None and _repo_path("configs/ds/") == "configs/ds/"
    assert _slug("`make-shards`: dataset_root.json → WebDataset shards") == "make-shards-dataset_rootjson--webdataset-shards"
