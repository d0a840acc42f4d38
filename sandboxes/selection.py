"""Which paths a snapshot covers: a set of root subtrees minus exclude globs.

Paths here are relative to the snapshot root and slash-separated ("workspace/data/x.csv"). A sandbox's snapshot
root mirrors its absolute paths (``/workspace`` is ``workspace``), so a tree taken on one provider means the same
on another. The selection decides what is walked, stored, and - on rollback - what may be deleted: anything
outside it (an excluded cache, a data mount) is never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


def glob_to_regex(pattern: str) -> str:
    """Translate a path glob: ``**`` spans folders, ``*`` and ``?`` stay within one path component."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Selection:
    """Root-relative subtrees to cover (``""`` is the whole root) and globs to leave out."""

    roots: tuple[str, ...] = ("",)
    excludes: tuple[str, ...] = ()
    _exclude_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        roots = tuple(sorted({r.strip("/") for r in self.roots}))
        # A root inside another root is redundant; "" covers everything.
        kept = tuple(r for r in roots if not any(_inside(r, other) for other in roots if other != r))
        object.__setattr__(self, "roots", kept)
        if self.excludes:
            regex = "|".join(f"(?:{glob_to_regex(p.strip('/'))})" for p in self.excludes)
            object.__setattr__(self, "_exclude_re", re.compile(f"^(?:{regex})$"))

    @classmethod
    def everything(cls) -> Selection:
        return cls()

    def excluded(self, path: str) -> bool:
        return self._exclude_re is not None and self._exclude_re.match(path) is not None

    def covers(self, path: str) -> bool:
        """True if ``path`` is inside (or is) a root. Exclusions are checked separately, per component, by the walk."""
        return any(_inside(path, root) for root in self.roots)

    def is_ancestor(self, path: str) -> bool:
        """True if ``path`` is a proper ancestor folder of some root (walked only to reach the roots)."""
        return any(_inside(root, path) and root != path for root in self.roots)

    def wanted_children(self, path: str) -> set[str] | None:
        """For an ancestor folder, the child names that lead to roots; None means every child is wanted."""
        if self.covers(path):
            return None
        prefix = f"{path}/" if path else ""
        names = set()
        for root in self.roots:
            if root.startswith(prefix) and root != path:
                names.add(root[len(prefix) :].split("/", 1)[0])
        return names

    def to_json(self) -> dict[str, list[str]]:
        return {"roots": list(self.roots), "excludes": list(self.excludes)}


def _inside(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(root + "/")
