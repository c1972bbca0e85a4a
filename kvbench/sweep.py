"""Sweeps through submitit: the grid points of a Hydra multirun as Slurm jobs (or local processes), packed.

``hydra/launcher=slurm`` and ``hydra/launcher=local`` (kvbench/configs/hydra/launcher/) pick the launchers below:
hydra-submitit-launcher's Slurm and local launchers plus ``pack``. With ``hydra.launcher.pack=N`` one submitit
job runs N grid points one after the other in one process, each as its own Hydra job (own directory, logs and
config), so they share the loaded model (``runner.loaded_model``) and the queue sees N times fewer jobs.

A job is checkpointable: when Slurm preempts it, or when it nears its time limit (Slurm sends the signal
``signal_delay_s`` before), submitit requeues it (at most ``max_num_timeout`` times for time-outs) and it runs
its points again. Points whose rows are complete are skipped and a half-done one resumes from its last flushed
example (kvbench.runner), all in the shared ``results_dir``.

Hydra builds launchers only from classes in its plugin registry (the ``hydra_plugins`` package).
``SweepCallback``, which kvbench/configs/hydra/default.yaml lists in ``hydra.callbacks`` (Hydra builds callbacks before
the sweeper and its launcher), adds ours there as ``hydra_plugins.kvbench_sweep.<class>``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.experimental.callback import Callback
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

PLUGIN_PREFIX = "hydra_plugins.kvbench_sweep."
# Launcher options that go to submitit's executor constructor rather than to its job parameters.
EXECUTOR_INIT = ("max_num_timeout",)

Point = tuple[list[str], int]  # a grid point: its overrides and its job number in the sweep
POINT_ROWS = "kvbench_rows.json"  # in a point's Hydra job folder: its job number and its rows' config hashes
_SWEEP: dict[str, Any] = {}  # the multirun this process started: its folder, results dir and start time


class PackedJob:
    """What one submitit job runs: its grid points in order, each through the launcher's per-point call
    (hydra-submitit-launcher's: compose the point's config, run it as a Hydra job).

    A failed point does not stop the others: its traceback goes to the job's stderr log and its failure
    to Hydra, which reports it once all jobs are done. Checkpointing resubmits the same points.
    """

    def __init__(self, launcher: PackingMixin) -> None:
        self.launcher = launcher
        self._checkpointed = False

    def __call__(self, points: list[Point], singleton_state: dict[Any, Any]) -> list[JobReturn]:
        returns = []
        for overrides, num in points:
            try:
                ret = self.launcher(overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", singleton_state)
            except SystemExit as exit:  # a point that exits (bad input) must not take the rest of the pack down
                if self._checkpointed or exit.code in (0, None):
                    raise  # submitit exits this way after requeueing the job
                failure = RuntimeError(f"grid point #{num} exited with status {exit.code}")
                ret = JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=failure)
            if ret.status is JobStatus.FAILED:
                error = ret._return_value
                print(f"[kvbench] grid point #{num} ({' '.join(overrides)}) failed:", file=sys.stderr)
                traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
                if type(error).__name__ == "UncompletedJobError":  # out of time and not requeued: stop here
                    raise error
            returns.append(ret)
        return returns

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on preemption or time-out: requeue the job with the same points."""
        import submitit

        self._checkpointed = True
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class PackingMixin:
    """hydra-submitit-launcher's launcher with ``pack``: grid points per submitit job."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: Any

    def __init__(self, pack: int = 1, **params: Any) -> None:
        if int(pack) < 1:
            raise ValueError(f"hydra.launcher.pack must be a positive number of grid points per job, got {pack}")
        self.pack = int(pack)
        super().__init__(**params)

    def executor(self) -> Any:
        """A submitit executor with the launcher's options (its generic ones as they are, others prefixed)."""
        import submitit

        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        init = {f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in EXECUTOR_INIT}
        executor = submitit.AutoExecutor(folder=self.params["submitit_folder"], cluster=self._EXECUTOR, **init)
        parameters = {
            key if key in generic else f"{self._EXECUTOR}_{key}": value
            for key, value in self.params.items()
            if key not in EXECUTOR_INIT and key != "submitit_folder"
        }
        executor.update_parameters(**parameters)
        return executor

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        assert self.config is not None
        points: list[Point] = [(list(overrides), initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        packs = [points[start : start + self.pack] for start in range(0, len(points), self.pack)]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        executor = self.executor()
        log.info(f"Submitit '{self._EXECUTOR}': {len(points)} grid points in {len(packs)} jobs, in {sweep_dir}")
        for job, pack in enumerate(packs):
            for overrides, num in pack:
                log.info(f"\tjob {job} #{num} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        jobs = executor.map_array(PackedJob(self), packs, [state] * len(packs))
        returns: list[JobReturn] = []
        for job, pack in zip(jobs, packs, strict=True):  # wait for every job before Hydra reports a failure
            try:
                returns += job.results()[0]
            except Exception as error:  # the job as a whole failed (killed, out of memory, ...): so did its points
                log.error(f"job {job.job_id} failed; its logs: {job.paths.stdout} and {job.paths.stderr}")
                returns += [JobReturn(overrides=o, status=JobStatus.FAILED, _return_value=error) for o, _ in pack]
        return returns


class PackedSlurmLauncher(PackingMixin, SlurmLauncher):
    """Grid points as Slurm array jobs, ``pack`` points per job."""


class PackedLocalLauncher(PackingMixin, LocalLauncher):
    """Grid points as local processes (submitit's local executor), ``pack`` points per process."""


LAUNCHERS = (PackedSlurmLauncher, PackedLocalLauncher)


def register() -> None:
    """Make the launchers buildable from ``_target_: hydra_plugins.kvbench_sweep.<class>``."""
    registry = Plugins.instance().class_name_to_class
    for launcher in LAUNCHERS:
        registry[PLUGIN_PREFIX + launcher.__name__] = launcher


class SweepCallback(Callback):
    """Listed in ``hydra.callbacks``: registers the launchers when Hydra starts, before it builds one, and
    notes where a multirun's points record their rows (for its one table, ``print_sweep``)."""

    def __init__(self) -> None:
        register()

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        _SWEEP.update(dir=Path(str(config.hydra.sweep.dir)), results_dir=str(config.results_dir), start=time.time())


def record_point(rows: list[dict[str, Any]]) -> None:
    """In a multirun point: write its job number and its rows' config hashes to its Hydra job folder."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    record = {"job": int(hydra.job.num), "config_hashes": [row["config_hash"] for row in rows]}
    (Path(hydra.runtime.output_dir) / POINT_ROWS).write_text(json.dumps(record))


def print_sweep(n_points: int) -> None:
    """The table of the multirun this process ran: the rows its ``n_points`` points recorded (in this run,
    not an earlier one of the same sweep folder), in grid order, whatever launcher ran them."""
    from kvbench.report import print_rows
    from kvbench.store import ResultStore

    if not _SWEEP:
        return
    points = []
    for path in _SWEEP["dir"].glob(f"*/{POINT_ROWS}"):
        if path.stat().st_mtime >= _SWEEP["start"] - 1:
            record = json.loads(path.read_text())
            if record["job"] < n_points:
                points.append(record)
    by_hash = {row["config_hash"]: row for row in ResultStore(_SWEEP["results_dir"]).rows()}
    keys = [key for point in sorted(points, key=lambda p: p["job"]) for key in point["config_hashes"]]
    print(f"[kvbench] sweep {_SWEEP['dir'].name}: {len(points)} of {n_points} points wrote rows")
    print_rows([by_hash[key] for key in dict.fromkeys(keys) if key in by_hash])
