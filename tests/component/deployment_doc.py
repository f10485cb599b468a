"""docs/DEPLOYMENT.md read as a script: its code blocks and the convention saying which shell blocks
run where. One parser for tests/component/test_deployment_doc.py (checks every block without boards) and
tests/e2e/test_deployment_commands.py (runs the runnable ones against a simulated fleet).

The convention (the doc states it in an HTML comment at its top):
- A ```sh block holds commands, one per line (a trailing backslash continues a line). It runs on the
  controller, from the repository root, as one shell session with the blocks before it (variables set
  on one line are seen by later lines and blocks).
- Its first line may say where instead: `# on a board ...` (as root on a board) or
  `# on a client ...` (in a client network); `# not on the simulator: <reason>` marks a block that
  needs real hardware or the internet. Such a block is checked, not run; the reason is for readers.
- A trailing `# prints: TEXT` states that the command's output contains TEXT; `# fails: TEXT` that it
  exits non-zero and its output contains TEXT. Every other command must exit 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import cache

from tests.support import REPO_ROOT

DOC = REPO_ROOT / "docs" / "DEPLOYMENT.md"
SHELL = "sh"
NOT_RUN_MARKER = "# not on the simulator:"
# The outcome is separated from the command by whitespace, so '#' inside a URL or a quoted
# format string is not taken for one.
OUTCOME = re.compile(r"\s+#\s*(prints|fails):\s*(.*)$")


class Place(Enum):
    CONTROLLER = "controller"
    BOARD = "board"
    CLIENT = "client"
    NOT_RUN = "not run"


PLACE_MARKERS = {"# on a board": Place.BOARD, "# on a client": Place.CLIENT, NOT_RUN_MARKER: Place.NOT_RUN}


class ConventionError(ValueError):
    """A shell block or command line that does not follow the doc's convention."""


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # 1-based line of the opening fence

    @property
    def header(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    @property
    def top_level_keys(self) -> set[str]:
        """Of a YAML block, without parsing it (snippets may hold `!vault` values)."""
        return set(re.findall(r"^(\w+):", self.text, re.MULTILINE))


@dataclass(frozen=True)
class Command:
    text: str  # without the outcome comment
    line: int
    prints: str | None = None
    fails: str | None = None


@dataclass(frozen=True)
class ShellBlock:
    block: Block
    place: Place
    reason: str
    commands: tuple[Command, ...]

    @property
    def runnable(self) -> bool:
        return self.place is not Place.NOT_RUN


@cache
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


@cache
def blocks() -> tuple[Block, ...]:
    text = doc_text()
    return tuple(Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
                 for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL))


def place_of(block: Block) -> tuple[Place, str]:
    """Where the block runs and, for a block that is not run, why."""
    header = block.header
    for marker, place in PLACE_MARKERS.items():
        if header.startswith(marker):
            reason = header.removeprefix(marker).strip()
            if place is Place.NOT_RUN and not reason:
                raise ConventionError(f"line {block.line}: say why the block cannot run on the simulator")
            return place, reason
    if re.match(r"#\s*(on|not)\b", header):
        raise ConventionError(f"line {block.line}: unknown placement {header!r}; "
                              f"use one of {list(PLACE_MARKERS)}")
    return Place.CONTROLLER, ""


def command_of(line: str, number: int) -> Command:
    match = OUTCOME.search(line)
    if match is None:
        if re.search(r"#\s*(prints|fails)\b", line):
            raise ConventionError(f"line {number}: write the outcome as `# prints: TEXT` or `# fails: TEXT`")
        return Command(line.strip(), number)
    kind, expected = match.group(1), match.group(2).strip()
    if not expected:
        raise ConventionError(f"line {number}: `# {kind}:` needs the text the output contains")
    text = line[:match.start()].strip()
    return Command(text, number, prints=expected if kind == "prints" else None,
                   fails=expected if kind == "fails" else None)


def shell_block(block: Block) -> ShellBlock:
    place, reason = place_of(block)
    commands = []
    pending, start = "", 0
    for offset, raw in enumerate(block.text.splitlines(), start=block.line + 1):
        if not pending:
            start = offset
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line, pending = pending + raw, ""
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(command_of(line, start))
    return ShellBlock(block, place, reason, tuple(commands))


@cache
def shell_blocks() -> tuple[ShellBlock, ...]:
    return tuple(shell_block(b) for b in blocks() if b.language == SHELL)


def shell_commands() -> list[Command]:
    return [command for block in shell_blocks() for command in block.commands]
