"""The experiment runner: one Flower run per cell of a grid, resumable.

Every cell is a real ``flwr run`` simulation of this app (``flwr_local.py``) writing its
own results directory; a cell whose results count (``sweep_grid``) is never rerun, so an
interrupted sweep resumes where it stopped. The tables are written at the end
(``sweep_tables``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from dpfpl_app.federation.flwr_local import LocalFlower
from dpfpl_app.federation.results import LAST_ROUNDS
from dpfpl_app.service.sweep_grid import (
    FAILED_DIR,
    SPEC_FILE,
    Cell,
    SweepSpec,
    cell_result,
    read_cell,
)
from dpfpl_app.service.sweep_tables import write_tables

logger = logging.getLogger(__name__)


def run_sweep(
    spec: SweepSpec,
    out_dir: Path,
    *,
    app_dir: Path,
    timeout_s: float = 3600.0,
    parallel: int = 1,
    retries: int = 1,
) -> list[Cell]:
    """Run every unfinished cell, ``parallel`` at a time, the first seed's cells first;
    returns the cells that failed.

    A failed cell is run again, up to ``retries`` more times, after the cells still
    waiting: on a loaded machine a simulation can die before its first round (Ray gives
    its raylet a fixed 30 s to register, which is how CI lost a cell), and a seeded cell's
    rerun is the same experiment, so an hours-long grid should not end with a hole a
    second attempt fills. A cell that fails every time costs ``retries`` extra runs.

    Both paths are made absolute first: the runs execute in a SuperLink whose working
    directory is ``app_dir``, so a relative ``output-dir`` would land (and be looked
    for) somewhere else, and a relative ``app_dir`` would be resolved twice. Cells run
    side by side each get their own local SuperLink (``LocalFlower``) and an equal share
    of the cores for torch's threads.
    A cell's results do not depend on what runs beside it: its noise and data are
    seeded by the cell alone (float sums do depend on torch's thread count).
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1 cells at a time, got {parallel}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0 extra attempts per failed cell, got {retries}")
    out_dir, app_dir = Path(out_dir).resolve(), Path(app_dir).resolve()
    cells = spec.cells()
    configs = {c.name: spec.run_config(c, out_dir) for c in cells}  # a bad grid stops here
    _claim(out_dir, spec)
    # seed by seed: a sweep stopped part-way has every method at its first seeds, which
    # the paired tables (sweep_pairs) can already compare
    todo = sorted((c for c in cells if cell_result(out_dir, c, spec.clients) is None),
                  key=lambda c: spec.seeds.index(c.seed))
    logger.info(
        "sweep %s: %d cells, %d done, %d to run, %d at a time (DP noise seeded for "
        "reproducibility: experiments only)",
        out_dir, len(cells), len(cells) - len(todo), len(todo), parallel,
    )
    pending: queue.SimpleQueue[tuple[Cell, int]] = queue.SimpleQueue()  # (cell, attempt)
    for cell in todo:
        pending.put((cell, 1))
    progress = _Progress(len(todo))
    # side by side, each run's torch gets its share of the cores (see LocalFlower)
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None

    def serve(slot: int) -> list[Cell]:
        failed = []
        home = out_dir / (".flwr" if slot == 0 else f".flwr-{slot}")
        with LocalFlower(app_dir, home, threads=threads) as flower:
            while True:
                try:
                    cell, attempt = pending.get_nowait()
                except queue.Empty:
                    return failed
                if _run_cell(flower, cell, configs[cell.name], spec, out_dir,
                             timeout_s, progress):
                    continue
                if attempt > retries:
                    failed.append(cell)
                    continue
                logger.warning("%s: running it again after the cells still waiting "
                               "(attempt %d of %d)", cell.name, attempt + 1, retries + 1)
                progress.add()
                pending.put((cell, attempt + 1))

    workers = min(parallel, len(todo)) or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        failed = [c for part in pool.map(serve, range(workers)) for c in part]
    write_tables(spec, out_dir)
    order = {c.name: i for i, c in enumerate(todo)}
    return sorted(failed, key=lambda c: order[c.name])


class _Progress:
    """Numbers the cells as they start and estimates the time left (thread-safe)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.started_at = time.monotonic()
        self.started = self.finished = 0
        self._lock = threading.Lock()

    def start(self) -> tuple[int, int]:
        """The number of the run starting and how many runs there are so far."""
        with self._lock:
            self.started += 1
            return self.started, self.total

    def add(self) -> None:
        """One more run to wait for: a failed cell's next attempt."""
        with self._lock:
            self.total += 1

    def finish(self) -> float:
        """Minutes left at the pace so far."""
        with self._lock:
            self.finished += 1
            per_cell = (time.monotonic() - self.started_at) / self.finished
            return per_cell * (self.total - self.finished) / 60


def _run_cell(
    flower: LocalFlower,
    cell: Cell,
    config: dict[str, int | float | bool | str],
    spec: SweepSpec,
    out_dir: Path,
    timeout_s: float,
    progress: _Progress,
) -> bool:
    """One cell's Flower run; True when it counts."""
    # a failed earlier attempt left a run directory and private state behind:
    # both belong to that attempt's run id and would be refused by the clients
    shutil.rmtree(out_dir / "runs" / cell.name, ignore_errors=True)
    shutil.rmtree(out_dir / "state" / cell.name, ignore_errors=True)
    (out_dir / FAILED_DIR / f"{cell.name}.log").unlink(missing_ok=True)
    (i, n), t0 = progress.start(), time.monotonic()
    logger.info("[%d/%d] %s ...", i, n, cell.name)
    try:
        run_id, status = flower.run(config, num_supernodes=spec.clients, timeout_s=timeout_s)
    except RuntimeError as err:  # refused or unreadable: this cell fails, not the sweep
        run_id, status = -1, str(err)
    doc, reason = read_cell(out_dir, cell, spec.clients)
    left = progress.finish()
    if doc is None:
        logger.error("[%d/%d] %s: run %d ended %s; the cell does not count: %s%s",
                     i, n, cell.name, run_id, status, reason,
                     _keep_log(flower, run_id, out_dir / FAILED_DIR / f"{cell.name}.log"))
        return False
    s = doc["summary"]
    logger.info(
        "[%d/%d] %s: local %.3f neighbour %.3f in %.0f s (about %.0f min left)",
        i, n, cell.name, s.get(f"last{LAST_ROUNDS}-local-acc", math.nan),
        s.get(f"last{LAST_ROUNDS}-neighbour-acc", math.nan), time.monotonic() - t0, left,
    )
    return True


def _keep_log(flower: LocalFlower, run_id: int, path: Path) -> str:
    """Save a failed run's Flower log where the next attempt will not delete it.

    The run's own directory is cleared when the cell is retried, and the log is the
    only record of why it failed (a client's traceback, a refused reply, a timeout).
    """
    if run_id < 0:
        return ""
    try:
        text = flower.log(run_id)
    except (OSError, subprocess.SubprocessError) as err:
        return f" (its Flower log could not be read: {err})"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return f" (its Flower log: {path})"


def _claim(out_dir: Path, spec: SweepSpec) -> None:
    """Refuse to mix two different grids' cells in one directory.

    The saved grid is compared as a grid, not as text, so a sweep written before a new
    field with a default was added resumes as long as its grid is the same.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SPEC_FILE
    if path.is_file():
        try:
            held: SweepSpec | None = SweepSpec.model_validate_json(path.read_text())
        except ValidationError:
            held = None
        if held != spec:
            raise ValueError(
                f"{out_dir} holds another sweep ({path}); resume it with the same "
                "arguments, or choose another --out"
            )
    path.write_text(spec.model_dump_json(indent=2))
