"""The `apply_patch` tool's patch format, parsed and applied to text: pure functions, no I/O.

The format is the one OpenAI's models are trained to write for their apply_patch tool::

    *** Begin Patch
    *** Add File: notes/todo.md
    +first line
    *** Delete File: old.txt
    *** Update File: src/app.py
    *** Move to: src/main.py              (optional rename)
    @@ def main():                         (optional: a line to find first)
     context line
    -removed line
    +added line
    *** End Patch

A hunk's context and removed lines must appear in the file, in order, after the previous hunk; lines are
matched exactly first, then ignoring trailing whitespace, then ignoring surrounding whitespace. Anything that does
not match is a `PatchError` saying which file and hunk, and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class PatchError(ValueError):
    """The patch is malformed or does not apply. The message says where."""


@dataclass
class Hunk:
    anchor: str | None  # the text after "@@", if any: a line to find before matching the hunk
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)


@dataclass
class FileChange:
    kind: str  # "add" | "delete" | "update"
    path: str
    move_to: str | None = None
    content: str = ""  # for "add"
    hunks: list[Hunk] = field(default_factory=list)


def parse_patch(text: str) -> list[FileChange]:
    lines = text.strip("\n").splitlines()
    if not lines or lines[0].strip() != "*** Begin Patch":
        raise PatchError("a patch starts with the line '*** Begin Patch'")
    if lines[-1].strip() != "*** End Patch":
        raise PatchError("a patch ends with the line '*** End Patch'")
    changes: list[FileChange] = []
    current: FileChange | None = None
    for number, line in enumerate(lines[1:-1], start=2):
        if line.startswith("*** Add File: "):
            current = FileChange("add", line.removeprefix("*** Add File: ").strip())
            changes.append(current)
        elif line.startswith("*** Delete File: "):
            current = FileChange("delete", line.removeprefix("*** Delete File: ").strip())
            changes.append(current)
        elif line.startswith("*** Update File: "):
            current = FileChange("update", line.removeprefix("*** Update File: ").strip())
            changes.append(current)
        elif current is None:
            raise PatchError(f"line {number}: expected '*** Add File:', '*** Delete File:' or '*** Update File:'")
        elif line.startswith("*** Move to: ") and current.kind == "update" and not current.hunks:
            current.move_to = line.removeprefix("*** Move to: ").strip()
        elif line.strip() == "*** End of File":
            continue
        elif current.kind == "add":
            if not line.startswith("+"):
                raise PatchError(f"line {number}: every line of an added file starts with '+'")
            current.content += line[1:] + "\n"
        elif current.kind == "delete":
            raise PatchError(f"line {number}: '*** Delete File:' takes no lines after it")
        elif line.startswith("@@"):
            current.hunks.append(Hunk(anchor=line[2:].strip() or None))
        else:
            if not current.hunks:
                current.hunks.append(Hunk(anchor=None))
            hunk = current.hunks[-1]
            marker, body = (line[0], line[1:]) if line else (" ", "")
            if marker == " ":
                hunk.old.append(body)
                hunk.new.append(body)
            elif marker == "-":
                hunk.old.append(body)
            elif marker == "+":
                hunk.new.append(body)
            else:
                raise PatchError(f"line {number}: hunk lines start with ' ', '-' or '+', not {marker!r}")
    for change in changes:
        if change.kind == "update" and not change.hunks and change.move_to is None:
            raise PatchError(f"{change.path}: '*** Update File:' needs at least one hunk")
    if not changes:
        raise PatchError("the patch changes no file")
    return changes


def _find(lines: list[str], wanted: list[str], start: int) -> int:
    for normalize in (lambda s: s, str.rstrip, str.strip):
        target = [normalize(w) for w in wanted]
        for i in range(start, len(lines) - len(wanted) + 1):
            if [normalize(x) for x in lines[i : i + len(wanted)]] == target:
                return i
    return -1


def apply_hunks(path: str, text: str, hunks: list[Hunk]) -> str:
    """The file's new text. Raises `PatchError` naming the hunk that does not match."""
    lines = text.splitlines()
    ends_with_newline = text.endswith("\n") or not text
    position = 0
    for number, hunk in enumerate(hunks, start=1):
        if hunk.anchor is not None:
            at = _find(lines, [hunk.anchor], position)
            if at < 0:
                raise PatchError(f"{path}: hunk {number}: the line after '@@' ({hunk.anchor!r}) is not in the file")
            position = at + 1 if hunk.old and hunk.old[0].strip() != hunk.anchor.strip() else at
        if not hunk.old:  # pure insertion: at the anchor, or at the end of the file
            at = position if hunk.anchor is not None else len(lines)
        else:
            at = _find(lines, hunk.old, position)
            if at < 0:
                shown = "\n".join(hunk.old[:6])
                raise PatchError(
                    f"{path}: hunk {number} does not match the file (its context and '-' lines must appear in order);"
                    f" it looks for:\n{shown}"
                )
        lines[at : at + len(hunk.old)] = hunk.new
        position = at + len(hunk.new)
    return "\n".join(lines) + ("\n" if ends_with_newline and lines else "")
