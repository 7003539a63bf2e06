"""Batch runs over many cases: one summary table that resumes, shared by the ranks of a launcher.

``lctfound segment predict FOLDER``, ``classify predict FOLDER|TABLE`` and ``features FOLDER`` treat one
case at a time and keep one summary table (one row per input, keyed by its ``input`` column, ``status``
"ok" or "error: …"). A re-run skips the cases that are done (row ok and output complete), so an
interrupted batch resumes.

Under ``torchrun`` or ``accelerate launch`` (RANK, WORLD_SIZE and LOCAL_RANK in the environment; several
processes on one or several nodes sharing the output's file system) the same command splits the cases:

1. rank 0 folds the part tables an interrupted run left behind into the summary; then every rank reads
   the summary, so a re-run with any number of ranks resumes any earlier run;
2. each rank checks whether the cases i ≡ rank (mod world) are done; the pending ones are gathered and
   dealt round robin in input order, so resumed work is balanced whatever split left it;
3. each rank writes its outputs atomically and its rows to ``<table>.rank-<r>.csv`` after each case;
4. rank 0 merges the summary and every part in input order (the table a single process writes),
   publishes it atomically and removes the parts.

Coordination exchanges a few small values, so the process group is gloo on every node (no GPU
collective, whatever device computes). Its timeout, ``LCTFOUND_BATCH_TIMEOUT_MINUTES`` (default 60),
bounds how long a rank waits for the others: since pending work is balanced, that is about one case.
A rank that fails closes its connections and the others stop with one line; the batch then resumes.
Exit code 1 (a case failed on some rank) comes from rank 0 only, after the merge (`BatchRun.exit_code`).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import LCTfoundError

TIMEOUT_VARIABLE = "LCTFOUND_BATCH_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 60.0

ReadRows = Callable[[Path], list]
WriteRows = Callable[[list, Path], Any]


# --------------------------------------------------------------------------------------------
# Ranks of a launch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """This process's place in a launch: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launcher_ranks(environ: Optional[dict] = None) -> Ranks:
    """The ranks torchrun and accelerate launch set (RANK, WORLD_SIZE, LOCAL_RANK); one process without them."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE") or 1)
        rank = int(env.get("RANK") or 0)
        local_rank = int(env.get("LOCAL_RANK") or 0)
    except ValueError:
        raise LCTfoundError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers; start several processes "
                            "with torchrun or accelerate launch") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise LCTfoundError(f"RANK {rank} does not fit WORLD_SIZE {world}; start several processes with torchrun "
                            "or accelerate launch")
    return Ranks(rank, world, local_rank)


def rank_device(choice: Optional[str], ranks: Ranks) -> Optional[str]:
    """``--device auto`` on a rank of a launch with CUDA: the GPU LOCAL_RANK (one GPU per process, as the
    launchers intend). Any other choice, or one process, is left as it is."""
    if not ranks.distributed or (choice or "auto").strip().lower() != "auto":
        return choice
    import torch

    if not torch.cuda.is_available():
        return choice
    return f"cuda:{ranks.local_rank % torch.cuda.device_count()}"


def idle_rank(ranks: Ranks, output: Any) -> bool:
    """One input under a launch is rank 0's work: another rank says so and returns True (it stops)."""
    if ranks.main:
        return False
    print(f"rank {ranks.rank} of {ranks.world}: one input, rank 0 writes {output}")
    return True


def batch_timeout() -> timedelta:
    """How long a rank waits for the others (`TIMEOUT_VARIABLE`, minutes)."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    try:
        minutes = float(text) if text else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise LCTfoundError(f"{TIMEOUT_VARIABLE}={text!r}: give the minutes a rank waits for the others, e.g. 60")
    return timedelta(minutes=minutes)


class RankGroup:
    """The gloo process group that coordinates the ranks (initialised from the launcher's environment:
    MASTER_ADDR, MASTER_PORT). Collective failures become one `LCTfoundError` line."""

    def __init__(self, ranks: Ranks):
        import torch.distributed as dist

        self.dist, self.ranks = dist, ranks
        self.timeout = batch_timeout()
        self.owned = not dist.is_initialized()
        self.group = None
        try:
            if self.owned:
                missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
                if missing:
                    raise LCTfoundError(f"WORLD_SIZE is {ranks.world} but {missing[0]} is not set; start several "
                                        "processes with torchrun or accelerate launch")
                dist.init_process_group("gloo", init_method="env://", rank=ranks.rank, world_size=ranks.world,
                                        timeout=self.timeout)
            else:  # inside a launch that already has a group (maybe NCCL): a gloo group of its own
                self.group = dist.new_group(backend="gloo", timeout=self.timeout)
        except LCTfoundError:
            raise
        except (RuntimeError, ValueError) as error:
            raise self._error("joining the other processes", error) from None

    def _error(self, what: str, error: BaseException) -> LCTfoundError:
        # gloo's text starts with its source location; its first sentence is what happened.
        text = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [""])[0])
        first = (text.split(". ")[0] or type(error).__name__)[:160]
        minutes = self.timeout.total_seconds() / 60
        return LCTfoundError(f"rank {self.ranks.rank}: {what}: another process of this batch stopped or did not "
                             f"answer within {minutes:g} min ({TIMEOUT_VARIABLE}) ({first}); run the same command "
                             "again to resume")

    def barrier(self, what: str) -> None:
        try:
            self.dist.barrier(group=self.group)
        except RuntimeError as error:
            raise self._error(what, error) from None

    def all_gather(self, value: Any, what: str) -> list:
        """``value`` of every rank, in rank order."""
        gathered: list = [None] * self.ranks.world
        try:
            self.dist.all_gather_object(gathered, value, group=self.group)
        except RuntimeError as error:
            raise self._error(what, error) from None
        return gathered

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Summary tables
# --------------------------------------------------------------------------------------------


def read_table(path: Path) -> list:
    """The rows of a CSV summary table, as dicts of strings."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LCTfoundError(f"{path}: cannot be read ({error}); move it aside",
                            option_hints={"overwrite": "or pass --overwrite to start again"}) from None


def write_table(rows: Sequence[dict], path: Path, columns: Sequence[str]) -> None:
    """Publish ``rows`` as a CSV table with ``columns`` (atomically)."""
    from .atomic import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def part_path(table: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its rows of ``table`` during a run (``summary.csv`` → ``summary.rank-1.csv``)."""
    return table.with_name(f"{table.stem}.rank-{rank}{table.suffix}")


def leftover_parts(table: Path) -> list:
    """Part tables of ``table`` in its folder (left by an interrupted run), by rank."""
    pattern = re.compile(rf"^{re.escape(table.stem)}\.rank-(\d+){re.escape(table.suffix)}$")
    if not table.parent.is_dir():
        return []
    found = [(int(m.group(1)), entry) for entry in table.parent.iterdir() if (m := pattern.match(entry.name))]
    return [entry for _, entry in sorted(found)]


class BatchRun:
    """One batch command's run over ``inputs`` (the table keys, sorted as the command lists them) with the
    summary table ``table``; used as a context manager. See the module docstring for the protocol.

    ``read_rows(path)`` and ``write_rows(rows, path)`` read and publish the command's table format;
    ``restart`` (``--overwrite``) ignores what earlier runs did.
    """

    def __init__(self, table: Path, inputs: Sequence[str], read_rows: ReadRows, write_rows: WriteRows,
                 restart: bool = False, ranks: Optional[Ranks] = None):
        self.table, self.inputs = Path(table), [str(key) for key in inputs]
        self.read_rows, self.write_rows, self.restart = read_rows, write_rows, restart
        self.ranks = ranks or launcher_ranks()
        self.group: Optional[RankGroup] = None
        self.previous: dict = {}  # input -> row, before this run
        self.rows: dict = {}      # input -> row, made by this rank in this run
        self.merged: Optional[list] = None  # the published table (rank 0), after `finish`
        self.skipped = 0          # inputs done earlier, over every rank (after `plan`)
        self._known = set(self.inputs)

    # The protocol, step by step -------------------------------------------------------------

    def __enter__(self) -> "BatchRun":
        if self.ranks.distributed:
            self.group = RankGroup(self.ranks)
            listing = hashlib.sha256("\n".join(self.inputs).encode("utf-8")).hexdigest()
            if len(set(self.group.all_gather(listing, "comparing the input lists"))) > 1:
                raise LCTfoundError("the processes of this batch see different inputs; the inputs and the output "
                                    "must be on a file system that every node sees")
        if self.ranks.main:
            self._fold_leftover_parts()
        if self.group is not None:
            self.group.barrier("waiting for rank 0 to read the earlier runs")
        if not self.restart and self.table.is_file():
            self.previous = {row.get("input", ""): row for row in self.read_rows(self.table)}
        return self

    def __exit__(self, *exc_info) -> None:
        if self.group is not None:
            self.group.close()

    def _fold_leftover_parts(self) -> None:
        parts = leftover_parts(self.table)
        if not parts:
            return
        if not self.restart:
            rows = {row.get("input", ""): row for row in self.read_rows(self.table)} if self.table.is_file() else {}
            for part in parts:  # a part is newer than the summary it was started from
                rows.update((row.get("input", ""), row) for row in self.read_rows(part))
            self.write_rows(self._ordered(rows), self.table)
        for part in parts:
            part.unlink()

    def plan(self, is_done: Callable[[int], bool]) -> list:
        """The input indices this rank works on: every rank checks ``is_done`` on its share of the inputs,
        then the pending ones are dealt round robin (in input order)."""
        rank, world = self.ranks.rank, self.ranks.world
        pending = [i for i in range(rank, len(self.inputs), world) if not is_done(i)]
        if self.group is not None:
            pending = sorted(i for part in self.group.all_gather(pending, "sharing out the cases") for i in part)
        self.skipped = len(self.inputs) - len(pending)
        return pending[rank::world]

    def record(self, key: str, row: dict) -> None:
        """Keep ``row`` (the result for input ``key``) on disk at once: in the summary for one process,
        in this rank's part table in a launch."""
        self.rows[str(key)] = row
        if self.group is None:
            self.write_rows(self._ordered({**self.previous, **self.rows}), self.table)
        else:
            self.write_rows(self._ordered(self.rows), part_path(self.table, self.ranks.rank))

    def finish(self, **counts: int) -> dict:
        """End the run: counts (e.g. ``failed=2``) summed over every rank; rank 0 publishes the merged
        table (`merged`) and removes the parts."""
        if self.group is None:
            self.merged = self._ordered({**self.previous, **self.rows})
            return dict(counts)
        own_part = part_path(self.table, self.ranks.rank)
        self.write_rows(self._ordered(self.rows), own_part)  # also when empty: rank 0 expects every part
        every = self.group.all_gather(counts, "waiting for the other processes to finish their cases")
        totals = {name: sum(int(c.get(name, 0)) for c in every) for name in counts}
        if self.ranks.main:
            rows = dict(self.previous)
            parts = [part_path(self.table, rank) for rank in range(self.ranks.world)]
            for rank, part in enumerate(parts):
                if not part.is_file():
                    raise LCTfoundError(f"{part}: the rows of rank {rank} are not here; the output must be on a file "
                                        "system that every node sees (run the same command again to resume)")
                rows.update((row.get("input", ""), row) for row in self.read_rows(part))
            self.merged = self._ordered(rows)
            self.write_rows(self.merged, self.table)
            for part in parts:
                part.unlink()
        return totals

    # Helpers -----------------------------------------------------------------------------

    def _ordered(self, rows: dict) -> list:
        """Rows in input order, then rows of earlier inputs no longer listed (in their earlier order)."""
        return ([rows[key] for key in self.inputs if key in rows]
                + [row for key, row in rows.items() if key not in self._known])

    def unlisted_output(self, target: Path) -> str:
        """The status of a case whose output exists but no row of this batch lists it: never replaced silently."""
        return (f"error: {target} already exists and is not listed in {self.table.name}; "
                "pass --overwrite to replace it")

    def exit_code(self, failed: int) -> int:
        """1 when a case failed on any rank (``failed`` is the total), else 0. Only rank 0 says so: a launcher
        stops every process as soon as one exits non-zero, which must not cut rank 0's merge short."""
        return 1 if failed and self.ranks.main else 0

    def shard_line(self, done: int, failed: int, unit: str) -> str:
        """The one line a rank other than 0 prints at the end."""
        return (f"rank {self.ranks.rank} of {self.ranks.world}: {done} {unit}, {failed} failed; "
                f"rank 0 merges the summary into {self.table}")
