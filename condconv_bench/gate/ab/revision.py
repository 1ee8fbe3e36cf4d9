"""The base revision of an A/B gate, checked out in a temporary git worktree.

A worktree shares the repository's objects, so checking out `origin/main` or `HEAD~1` costs a
file copy, not a clone, and needs no network; it is removed when the gate ends. The head side
is the working tree as it is, uncommitted changes included: that is the code under review.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from condconv_bench.errors import CondConvBenchError


class RevisionError(CondConvBenchError):
    """A repository or revision the A/B gate cannot check out."""


@dataclass(frozen=True)
class Revision:
    """One side of the comparison: what the user named, the commit it is, and where its files are."""

    name: str
    commit: str | None  # None for the working tree
    root: Path

    @property
    def label(self) -> str:
        return f"{self.name} ({self.commit[:10]})" if self.commit else f"{self.name} ({self.root})"


def _git(repo: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise RevisionError("git is not installed: the A/B gate checks out the base revision with git") from None
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise RevisionError(f"git {' '.join(args[:2])} in {repo}: {message}")
    return done.stdout.strip()


def repository_root(path: Path) -> Path:
    """The top of the git repository that contains `path`."""
    try:
        return Path(_git(path, "rev-parse", "--show-toplevel"))
    except RevisionError:
        raise RevisionError(f"{path}: not inside a git repository (the A/B gate compares git revisions; use --repo)") from None


def working_tree(repo: Path) -> Revision:
    return Revision("working tree", None, repo)


@contextmanager
def checked_out(repo: Path, ref: str) -> Iterator[Revision]:
    """`ref` of `repo` in a temporary worktree, removed afterwards."""
    try:
        commit = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except RevisionError:
        raise RevisionError(f"revision {ref!r}: no such commit in {repo} (a shallow clone lacks history: fetch it)") from None
    with tempfile.TemporaryDirectory(prefix="condconv-bench-base-") as scratch:
        root = Path(scratch) / "tree"
        _git(repo, "worktree", "add", "--detach", "--quiet", str(root), commit)
        try:
            yield Revision(ref, commit, root)
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(root)], capture_output=True)
            subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)
