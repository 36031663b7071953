"""Implementations at a git revision: `--impls chunked@origin/main` measures the kernels/ folder
of that revision beside today's, with today's harness.

The name `X@REV` is pinned to `X@<commit>` (12 hex digits) when a run is planned, so a resumed run
or a branch that moved later still means the same code. The revision's kernels/ folder is
exported once (`git archive`) into a cache keyed by its commit:

    $CTXBENCH_CACHE (default $XDG_CACHE_HOME/ctxbench, else ~/.cache/ctxbench)/revisions/<commit>/kernels/

A worker that measures `X@<commit>` points the package `ctxbench.kernels` at that folder before
any implementation is imported (use_revision), so X and every kernels/ module it imports (the
blockwise helpers, the Triton configurations) are the revision's, while what measures it (the
worker, the timing loop, the reference, the mask rules in ctxbench.core) is the current
checkout's: both sides of an A/B comparison are measured the same way. The parent process plans
`X@<commit>` with the current X's declared capabilities; a capability the revision lacks shows
up as its own `unsupported` row when the worker resolves it.
"""

from __future__ import annotations

import importlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

SEP = "@"
SHORT = 12  # hex digits of a pinned commit
_PINNED = re.compile(r"^[0-9a-f]{%d}$" % SHORT)


class RevisionError(ValueError):
    """A revision that cannot be measured (not a commit, no kernels/ folder, no git): one line."""


def split(name: str) -> tuple[str, str | None]:
    """("chunked", "origin/main") for "chunked@origin/main"; (name, None) without a revision."""
    if SEP not in name or ":" in name.split(SEP, 1)[0]:
        return name, None
    base, rev = name.split(SEP, 1)
    return base, rev


def is_pinned(name: str) -> bool:
    """Whether name is `X@<12 hex digits>` (a pinned revision)."""
    rev = split(name)[1]
    return rev is not None and bool(_PINNED.match(rev))


def repository() -> str:
    """The git checkout the built-in implementations come from (the folder holding kernels/)."""
    folders = list(_kernels().__path__)
    if not folders:
        raise RevisionError("ctxbench.kernels has no folder; implementations at a revision need a git checkout")
    return os.path.dirname(os.path.abspath(folders[0]))


def _kernels():
    """The package of the built-in implementations, imported by name as the registry does
    (ctxbench.core.registry.load_builtins): kernels/ is loaded, never imported, by core."""
    return importlib.import_module("ctxbench.kernels")


def cache_root() -> str:
    """Where revisions are exported: $CTXBENCH_CACHE, else $XDG_CACHE_HOME/ctxbench, else ~/.cache/ctxbench."""
    if os.environ.get("CTXBENCH_CACHE"):
        return os.environ["CTXBENCH_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ctxbench")


def folder(commit: str) -> str:
    """The exported kernels/ folder of a pinned commit (12 hex digits)."""
    return os.path.join(cache_root(), "revisions", commit, "kernels")


def _git(repo: str, *args: str) -> bytes:
    try:
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, timeout=120)
    except FileNotFoundError:
        raise RevisionError("git is not installed; implementations at a revision (X@REV) need it") from None
    except subprocess.TimeoutExpired:
        raise RevisionError(f"git {' '.join(args)} in {repo} took over 120 s") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise RevisionError(err[-1] if err else f"git {' '.join(args)} failed")
    return done.stdout


def pin(name: str) -> str:
    """`X@REV` as `X@<commit>`, with that commit's kernels/ exported into the cache (once).
    RevisionError (one line) when REV is not a commit of the checkout or has no kernels/ folder."""
    base, rev = split(name)
    if rev is None:
        return name
    if not rev:
        raise RevisionError(f"{name}: give a git revision after '@' (a commit, a branch, HEAD~1)")
    if _PINNED.match(rev) and os.path.isdir(folder(rev)):
        return name
    repo = repository()
    try:
        commit = _git(repo, "rev-parse", "--verify", "--quiet", rev + "^{commit}").decode().strip()
    except RevisionError:
        raise RevisionError(f"{name}: {rev!r} is not a commit of the git checkout {repo}") from None
    short = commit[:SHORT]
    export(repo, commit, folder(short))
    return f"{base}{SEP}{short}"


def export(repo: str, commit: str, dest: str) -> None:
    """Write the commit's kernels/ folder to dest (atomically: a half-written folder is never used)."""
    if os.path.isdir(dest):
        return
    try:
        archive = _git(repo, "archive", "--format=tar", commit, "kernels")
    except RevisionError:
        raise RevisionError(f"commit {commit[:SHORT]} of {repo} has no kernels/ folder to measure") from None
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    except OSError as exc:
        raise RevisionError(f"cannot write the revision's kernels/ under {parent} ({exc.strerror or exc}); "
                            "set CTXBENCH_CACHE to a writable folder") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: no links out of the folder
                tar.extractall(tmp, filter="data")
            else:  # the archive is git's own, of the checkout's commit
                tar.extractall(tmp)
        if os.path.exists(os.path.join(tmp, "kernels", "__init__.py")):
            # before ctxbench.kernels (a namespace folder imported as ctxbench.kernels) the folder
            # was a top-level package `kernels`, whose modules import each other by that name
            raise RevisionError(f"commit {commit[:SHORT]} predates the ctxbench.kernels layout (its kernels/ "
                                "has an __init__.py); measure a later revision")
        try:
            os.rename(os.path.join(tmp, "kernels"), dest)
        except OSError:
            if not os.path.isdir(dest):  # another process exported it first otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(dest):
            try:
                os.rmdir(parent)  # nothing of a failed export stays
            except OSError:
                pass


def use_revision(name: str) -> None:
    """In a worker measuring `X@<commit>`: import every implementation from that commit's kernels/.

    Must run before any ctxbench.kernels module is imported in this process (a worker serves
    one implementation, so it does); RevisionError otherwise, or when the export is missing."""
    import sys

    kernels = _kernels()
    base, rev = split(name)
    if rev is None:
        return
    if not _PINNED.match(rev):
        raise RevisionError(f"{name}: a worker measures pinned revisions only (X@<{SHORT} hex digits>)")
    path = folder(rev)
    if list(kernels.__path__) == [path]:
        return
    if not os.path.isdir(path):
        raise RevisionError(f"{name}: no exported kernels/ at {path}; plan the run again (it exports the revision)")
    loaded = [m for m in sys.modules if m.startswith("ctxbench.kernels.")]
    if loaded:
        raise RevisionError(f"{name}: this process already imported {loaded[0]} from another revision")
    kernels.__path__[:] = [path]
