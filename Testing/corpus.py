"""The bad-input corpus's machinery (issue 12, "Tests"): cases, their runner and the totals.

A case is ``Case(name, setup, argv, expect)``: ``setup(inputs, values)`` writes the case's files
into ``inputs`` (with `bad_files` / `data_factory`) and returns placeholders; ``argv`` is the
command line with ``{placeholders}``; ``expect`` says what a correct refusal looks like. Every
case asserts the same rules:

* exit code 2 (130 for an interrupt), exactly one line on stderr (``error: ...``), no traceback
  (nor the CLI's last-defence "internal error" line, which stands for one);
* every file that existed before — inputs, models, outputs the command must not replace — is
  byte-identical afterwards;
* no partial output: nothing new under the output folder or beside the inputs (temporaries
  included).

The outcome of every case is also counted (`Totals`: tried / clean / traceback / garbage
accepted / data lost / other) and printed at the end of the session; set
``LCTFOUND_CORPUS_REPORT=FILE`` to get them as JSON as well. Add a case for every new bug.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

#: Placeholders every case has: ``{in}`` (its inputs folder), ``{outdir}`` (an empty output
#: folder) and ``{out}`` (a path in it that does not exist yet).
Setup = Callable[[Path, dict], Optional[dict]]


@dataclass(frozen=True)
class Expect:
    code: int = 2
    #: A phrase the one stderr line must contain (None: any ``error: ...`` line).
    phrase: Optional[str] = None
    #: Environment variables for the run (values may hold placeholders).
    env: tuple[tuple[str, str], ...] = ()
    #: Set while the fix is missing: the case runs as ``xfail(strict=True, reason=...)``.
    missing_fix: Optional[str] = None
    slow: bool = False
    #: Stop the command once it has clearly started long work on the bad input (`WORK_BUDGET`
    #: cancellation checks) and count it as garbage accepted; off where the work must run (full
    #: disks) or where stopping it would hide lost data (outputs that are inputs).
    tripwire: bool = True


#: Cancellation checks (one per slice, step or epoch) a command may pass before it counts as working.
WORK_BUDGET = 12


class WorkStarted(BaseException):
    """Raised by the tripwire: the command began real work on an input it should have refused."""


def install_tripwire(monkeypatch) -> None:
    from lctfound.progress import Progress

    calls = {"n": 0}
    original = Progress.check_cancelled

    def check_cancelled(self) -> None:
        calls["n"] += 1
        if calls["n"] > WORK_BUDGET:
            raise WorkStarted()
        original(self)

    monkeypatch.setattr(Progress, "check_cancelled", check_cancelled)


@dataclass(frozen=True)
class Case:
    name: str
    setup: Setup
    argv: tuple[str, ...]
    expect: Expect = Expect()


def fill(text: str, values: dict) -> str:
    return str(text).format(**{k: str(v) for k, v in values.items()})


# --------------------------------------------------------------------------------------------
# What a run did to the file system
# --------------------------------------------------------------------------------------------


def snapshot(*folders: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """sha256 of every file (links: their target text) under ``folders``, by path."""
    found: dict[str, str] = {}
    skipped = tuple(str(s) for s in skip)
    for folder in folders:
        if not folder.exists():
            continue
        for directory, subfolders, files in os.walk(folder):
            if directory.startswith(skipped):
                subfolders[:] = []
                continue
            for name in subfolders + files:
                path = os.path.join(directory, name)
                if os.path.islink(path):
                    found[path] = "link:" + os.readlink(path)
                elif name in files:
                    digest = hashlib.sha256()
                    with open(path, "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(block)
                    found[path] = digest.hexdigest()
                else:
                    found[path] = "folder"
    return found


@dataclass
class Outcome:
    code: Optional[int]
    stdout: str
    stderr: str
    changed: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def traceback(self) -> bool:
        text = self.stdout + self.stderr
        return "Traceback (most recent call last)" in text or "internal error (" in self.stderr

    def category(self, expected_code: int) -> str:
        """data lost > traceback > garbage accepted > clean > other (wrong code, lines, leftovers)."""
        if self.changed:
            return "data lost"
        if self.traceback:
            return "traceback"
        if self.code == 0:
            return "garbage accepted"
        if (self.code == expected_code and len(self.lines) == 1 and self.lines[0].startswith("error: ")
                and not self.created):
            return "clean"
        return "other"

    def check(self, expect: Expect) -> None:
        """The corpus's assertions, most important first."""
        assert not self.changed, f"input or existing files changed: {self.changed}"
        assert not self.traceback, f"traceback or internal error:\n{self.stderr[-3000:]}"
        assert self.code == expect.code, f"exit code {self.code}, expected {expect.code}; stderr: {self.stderr!r}"
        assert len(self.lines) == 1, f"expected one stderr line, got {len(self.lines)}: {self.stderr!r}"
        assert self.lines[0].startswith("error: "), self.lines[0]
        if expect.phrase is not None:
            assert expect.phrase.lower() in self.lines[0].lower(), (expect.phrase, self.lines[0])
        assert not self.created, f"partial output left behind: {self.created}"


def compare(before: dict[str, str], after: dict[str, str], inputs_and_outputs: tuple[Path, ...]) -> tuple[list, list]:
    changed = sorted(path for path, digest in before.items() if after.get(path) != digest)
    roots = tuple(str(p) for p in inputs_and_outputs)
    created = sorted(path for path in after if path not in before and path.startswith(roots))
    return changed, created


# --------------------------------------------------------------------------------------------
# Totals
# --------------------------------------------------------------------------------------------

CATEGORIES = ("clean", "traceback", "garbage accepted", "data lost", "other")


class Totals:
    def __init__(self) -> None:
        self.cases: dict[str, str] = {}

    def record(self, name: str, category: str) -> None:
        self.cases[name] = category

    def summary(self) -> dict[str, Any]:
        counts = {category: 0 for category in CATEGORIES}
        for category in self.cases.values():
            counts[category] += 1
        return {"tried": len(self.cases), **counts,
                "not clean": sorted(f"{name}: {category}" for name, category in self.cases.items()
                                    if category != "clean")}

    def line(self) -> str:
        s = self.summary()
        return ("bad-input corpus: " + f"{s['tried']} tried, " + ", ".join(f"{s[c]} {c}" for c in CATEGORIES))

    def write(self) -> None:
        target = os.environ.get("LCTFOUND_CORPUS_REPORT")
        if target and self.cases:
            Path(target).write_text(json.dumps(self.summary(), indent=2) + "\n")


TOTALS = Totals()
