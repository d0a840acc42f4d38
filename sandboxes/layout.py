"""The portable sandbox layout: what every provider's sandbox looks like from inside, whoever runs it.

Snapshots, venvs (whose scripts hold absolute paths) and commands move between providers unchanged only if every
sandbox agrees on these: the workspace at ``/workspace`` (relative paths in a Manifest are relative to it), the home
folder at ``/home/sandbox``, commands running as uid 1000, and the same base environment. The Manifest validates
paths against them; the providers build their sandboxes from them. Pure constants.
"""

from __future__ import annotations

WORKSPACE = "/workspace"
HOME = "/home/sandbox"
#: Where a sandbox may write (and what a snapshot may cover): everything else is the image's, read-only.
WRITABLE_ROOTS = (WORKSPACE, HOME)
#: The user commands run as: files keep their owner when a snapshot moves to another provider.
SANDBOX_UID = 1000
#: Every command's environment before the Manifest's and the step's variables are added.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": HOME,
    "USER": "sandbox",
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
}
#: Variables a Manifest or step may not set: the layout owns them.
RESERVED_ENV = frozenset({"HOME", "PATH", "USER", "PWD", "TMPDIR"})
