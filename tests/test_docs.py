"""The documentation stays true: README.md and docs/*.md link only to files and headings that exist,
docs/cli.md lists exactly the options each command's parser has, and every `osd ...` command line
quoted in the docs names a real command with real options. No network, no model: the parsers are
built by the commands themselves, stopped at `--help`."""

from __future__ import annotations

import argparse
import re
import unicodedata
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI_PAGE = ROOT / "docs" / "cli.md"
README_MAX_LINES = 250
SOURCE_DIRS = ("serving", "store", "trainer", "distill", "deploy", "benchmarks", "tests", "docs")

FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
INLINE_CODE = re.compile(r"(`+)((?:(?!\n\s*\n).)+?)\1", re.S)  # within a paragraph
LINK_TARGET = re.compile(r"\]\(\s*<?([^\s()<>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LONG_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND = re.compile(r"(?<![\w/.:-])(osd|python -m benchmarks\.gpu_bench|make)(?=\s|$)")
SEGMENT_END = re.compile(r"\s#|;|&&|\|\||\s\|\s")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- reading markdown --------------------------------------------------------------------------


@cache
def split_code(path: Path) -> tuple[str, tuple[tuple[int, str], ...]]:
    """The file's prose, with code blanked out (newlines kept, so offsets keep their line), and its
    code: each inline span and each command of a fenced block (`\\` continuations joined), with the
    line it starts on."""
    prose: list[str] = []
    code: list[tuple[int, str]] = []
    fence = None
    pending: tuple[int, str] | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        opener = FENCE.match(line)
        if fence is None and opener:
            fence = opener.group(1)[0] * len(opener.group(1))
            prose.append("")
        elif fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            else:
                start, text = pending or (number, "")
                text += " " + line.rstrip("\\").strip()
                pending = (start, text) if line.rstrip().endswith("\\") else None
                if pending is None:
                    code.append((start, text.strip()))
            prose.append("")
        else:
            prose.append(line)
    text = "\n".join(prose)
    for match in INLINE_CODE.finditer(text):
        code.append((text.count("\n", 0, match.start()) + 1, " ".join(match.group(2).split())))
    blanked = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return blanked, tuple(sorted(code))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = text.replace("`", "").replace("*", "").lower()
    kept = (c for c in text if c.isalnum() or c in " -_" or unicodedata.category(c).startswith("M"))
    return "".join(kept).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    prose, _ = split_code(path)
    original = path.read_text().splitlines()
    for number, line in enumerate(prose.splitlines()):
        if HEADING.match(line):  # read the heading from the original line: its code spans count
            base = slug(HEADING.match(original[number]).group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every link and image outside code."""
    prose, _ = split_code(path)
    for match in LINK_TARGET.finditer(prose):
        yield prose.count("\n", 0, match.start()) + 1, match.group(1)


def broken_links() -> list[str]:
    broken = []
    for path in DOCS:
        for line, target in links(path):
            where = f"{rel(path)}:{line}: ({target})"
            if re.match(r"(https?|mailto):", target):
                continue
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                broken.append(f"{where} has a scheme other than http, https or mailto")
                continue
            file, _, fragment = unquote(target).partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{where} points to {file}, which does not exist")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{where}: no heading in {rel(dest)} has the anchor #{fragment}")
    return broken


# --- the command line --------------------------------------------------------------------------


def parser_of(run: Callable[[], object]) -> argparse.ArgumentParser:
    """The parser that answered `--help` when `run` was called with it: print_help is caught, so
    nothing prints and nothing after the parse runs."""
    answered: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.print_help
    argparse.ArgumentParser.print_help = lambda self, file=None: answered.append(self)
    try:
        with pytest.raises(SystemExit) as exit_:
            run()
    finally:
        argparse.ArgumentParser.print_help = original
    assert exit_.value.code in (0, None) and answered, "--help did not reach a parser"
    return answered[-1]


@cache
def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command line the docs may quote, by its name, through the real entry points."""
    from benchmarks import gpu_bench
    from deploy import cli

    found = {"osd": parser_of(lambda: cli.main(["--help"]))}
    for name, command in cli.COMMANDS.items():
        if name != "bench":
            found[f"osd {name}"] = parser_of(lambda command=command: command(["--help"]))
    found["osd bench"] = parser_of(lambda: cli.bench(["--help"]))
    for name in cli.BENCHMARKS:
        found[f"osd bench {name}"] = parser_of(lambda name=name: cli.bench([name, "--help"]))
    found["python -m benchmarks.gpu_bench"] = parser_of(lambda: gpu_bench.main(["--help"]))
    return found


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def cli_sections() -> dict[str, tuple[int, list[str]]]:
    """docs/cli.md's `## \\`command\\`` sections: the command, the heading's line and the section's lines."""
    sections: dict[str, tuple[int, list[str]]] = {}
    current = None
    for number, line in enumerate(CLI_PAGE.read_text().splitlines(), 1):
        heading = re.match(r"^## `([^`]+)`\s*$", line)
        if heading:
            current = heading.group(1)
            sections[current] = (number, [])
        elif line.startswith("## "):
            current = None
        elif current:
            sections[current][1].append(line)
    return sections


def quoted_commands(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, program, the rest up to the end of that command) of every command quoted in code."""
    for line, code in split_code(path)[1]:
        starts = list(COMMAND.finditer(code))
        for i, match in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(code)
            rest = SEGMENT_END.split(code[match.end() : end], maxsplit=1)[0]
            yield line, match.group(1), rest


def command_problems(path: Path) -> list[str]:
    """Each quoted `osd ...`, `python -m benchmarks.gpu_bench ...` and `make ...` must name a real
    command, and every --option in it must be one of that command's."""
    known = parsers()
    problems = []
    for line, program, rest in quoted_commands(path):
        words = rest.split()
        where = f"{rel(path)}:{line}: `{program} {rest.strip()}`"
        if program == "make":
            if words and re.fullmatch(r"[a-z][\w-]*", words[0]) and words[0] not in make_targets():
                problems.append(f"{where}: the Makefile has no target {words[0]}")
            continue
        name = program
        if program == "osd" and words and not words[0].startswith("-"):
            sub = re.split(r"[^\w-]", words[0])[0]
            name = f"osd {sub}"
            if name not in known:
                problems.append(f"{where}: osd has no command {sub!r}")
                continue
            if sub == "bench" and len(words) > 1 and not words[1].startswith(("-", "<")):
                bench = re.split(r"[^\w-]", words[1])[0]
                name = f"osd bench {bench}"
                if name not in known:
                    problems.append(f"{where}: osd bench has no benchmark {bench!r}")
                    continue
        for option in set(LONG_OPTION.findall(rest)) - long_options(known[name]) - {"--help"}:
            problems.append(f"{where}: {name} has no option {option}")
    return problems


# --- tests -------------------------------------------------------------------------------------


def test_readme_is_the_front_door() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_every_relative_link_and_image_resolves() -> None:
    broken = broken_links()
    assert not broken, f"{len(broken)} broken link(s):\n" + "\n".join(broken)


def test_link_checker_sees_what_is_broken(tmp_path: Path) -> None:
    """The checker itself: a page with a good link, a missing file, a missing anchor, and a link
    inside code (ignored)."""
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A heading (`osd demo --quick`)\n")
    page.write_text(
        "# Page\n\n[ok](other.md#a-heading-osd-demo---quick) [self](#page) ![img](missing.png)\n"
        "`[not a link](nowhere.md)`\n\n```\n[nor](this.md)\n```\n[bad anchor](other.md#nope)\n"
    )
    found = sorted((line, target) for line, target in links(page))
    assert found == [(3, "#page"), (3, "missing.png"), (3, "other.md#a-heading-osd-demo---quick"),
                     (9, "other.md#nope")]  # fmt: skip
    assert "a-heading-osd-demo---quick" in anchors(tmp_path / "other.md")
    assert slug("GPU (`benchmarks/gpu_bench.py`)") == "gpu-benchmarksgpu_benchpy"
    assert slug("Acceptance → α, 2× faster") == "acceptance--α-2-faster"


def test_cli_page_lists_every_option_of_every_command() -> None:
    sections = cli_sections()
    problems = []
    for name, parser in parsers().items():
        if name in ("osd", "osd bench"):  # the choosers: a command or benchmark name, no options
            continue
        if name not in sections:
            problems.append(f"docs/cli.md has no section `## \\`{name}\\``")
            continue
        line, body = sections[name]
        listed = {m.group(1) for m in map(re.compile(r"^- `(--[a-z][a-z0-9-]*)").match, body) if m}
        for option in sorted(long_options(parser) - listed):
            problems.append(f"docs/cli.md:{line}: section {name} does not list {option}")
    for name, (line, body) in sections.items():
        if name not in parsers():
            if name.startswith(("osd", "python")):
                problems.append(f"docs/cli.md:{line}: section {name} is not a command")
            continue
        text = "\n".join(body)
        for code in INLINE_CODE.finditer(text):
            at = line + 1 + text.count("\n", 0, code.start())
            for option in sorted(set(LONG_OPTION.findall(code.group(2))) - long_options(parsers()[name])):
                problems.append(f"docs/cli.md:{at}: section {name} names {option}, which it does not have")
    assert not problems, "\n".join(problems)


def test_commands_quoted_in_the_docs_exist() -> None:
    problems = [problem for path in DOCS for problem in command_problems(path)]
    assert not problems, f"{len(problems)} command(s) that do not exist:\n" + "\n".join(problems)


def test_source_files_named_in_the_docs_exist() -> None:
    """A path such as `serving/engine/hf.py` quoted in code must be in the repository (outputs a
    command would write, JSON and the like, are not checked)."""
    pattern = re.compile(rf"^(?:{'|'.join(SOURCE_DIRS)})/[\w./-]*\.(?:py|yaml|yml|png|md)$")
    missing = []
    for path in DOCS:
        for line, code in split_code(path)[1]:
            for word in code.split():
                word = word.strip("(),;:'\"")
                if pattern.match(word) and not (ROOT / word).exists():
                    missing.append(f"{rel(path)}:{line}: {word}")
    assert not missing, "files named in the docs that do not exist:\n" + "\n".join(missing)
