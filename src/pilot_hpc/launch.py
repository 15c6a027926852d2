"""Experiment grids as Slurm job arrays through submitit (the only submitit importer).

    python -m pilot_hpc.launch --grid configs/grids/smoke_seeds.yaml            # one Slurm array
    python -m pilot_hpc.launch --grid configs/grids/smoke_seeds.yaml --local    # same runs, no Slurm
    python -m pilot_hpc.launch --grid configs/grids/smoke_seeds.yaml --dry-run  # print the sbatch script
    python -m pilot_hpc.launch collect --grid configs/grids/smoke_seeds.yaml    # one table of all runs

A grid file names a base config, common overrides and a `grid:` of key -> values; the
cartesian product gives the runs, each with its own run.output_dir under output_root.
Each array element is one multi-task MPI job: submitit starts `ntasks` tasks with
`srun --mpi=pmi2`, and every task runs pilot_hpc.main, which joins one MPI world.
Preemption and time limits: Slurm's USR2 makes every rank checkpoint at its next step
(pilot_hpc.main exits 75), the batch script's teardown requeues the element once srun
returns (REQUEUE_ON_75), and the requeued element resumes from its HDF5 checkpoint (run.resume=auto).

A run that another grid next to this one (a sibling folder of output_root) already
finished with the same configuration, bar its output folder, is not run again: the
element's folder gets a reused.json naming that run, and the tables read its metrics.
A study whose tables share a row (Pilot with its defaults in Tables 1, 3, 5, ...) runs
it once. This relies on a run being a function of its configuration (W-independent,
bitwise resumable), which the tests check.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import glob
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

import yaml

from pilot_hpc import jsonout
from pilot_hpc.config import ConfigError, load_config
from pilot_hpc.tools.mpiexec import find_mpiexec


@dataclass
class SlurmSpec:
    ntasks: int = 9
    cpus_per_task: int = 1
    gpus_per_task: int = 0  # GPU clusters: 1 (one GPU per client rank)
    time_min: int = 240
    partition: str = ""
    array_parallelism: int = 8  # elements of the array running at once (slurm_array_parallelism)
    signal_delay_s: int = 300  # USR2 this long before the time limit: time to checkpoint
    max_requeues: int = 5
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load ...)


@dataclass
class Grid:
    name: str
    config: str
    output_root: str
    overrides: list[str]
    axes: dict[str, list]
    slurm: SlurmSpec
    local_parallel: int = 1
    # name -> overrides: rows of a table that are not one key's values (e.g. ablations
    # that switch several parts at once), crossed with the axes; "variant" then acts as
    # an axis for --group-by.
    variants: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Element:
    name: str
    output_dir: str
    argv: list[str]  # pilot_hpc.main arguments
    variant: str = ""  # the grid's variant this element belongs to (or "")
    config_hash: str = ""  # of the element's config (what metrics.json records)


def load_grid(path: str) -> Grid:
    if not os.path.isfile(path):
        raise ConfigError(f"grid file {path!r} does not exist")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:  # one line: file, line, column, the parser's complaint
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
            what = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ConfigError(f"{where}: not valid YAML: {what}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (name, config, grid, ...)")
    valid = {"name", "config", "output_root", "overrides", "grid", "slurm", "local_parallel", "variants"}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    for key in ("name", "config", "grid"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    axes = raw["grid"]
    if not isinstance(axes, dict) or not axes or not all(isinstance(v, list) and v for v in axes.values()):
        raise ConfigError(f"{path}: 'grid' must map section.key to a non-empty list of values")
    variants = raw.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, list) for v in variants.values()):
        raise ConfigError(f"{path}: 'variants' must map a name to a list of section.key=value overrides")
    try:
        slurm = SlurmSpec(**(raw.get("slurm") or {}))
    except TypeError as err:
        raise ConfigError(f"{path}: slurm: {err}; valid keys: {sorted(SlurmSpec.__dataclass_fields__)}") from None
    # Absolute paths: array elements may start in another working directory.
    return Grid(name=raw["name"], config=os.path.abspath(raw["config"]),
                output_root=os.path.abspath(raw.get("output_root", f"runs/grids/{raw['name']}")),
                overrides=list(raw.get("overrides") or []), axes=axes, slurm=slurm,
                local_parallel=int(raw.get("local_parallel", 1)),
                variants={str(k): [str(o) for o in v] for k, v in variants.items()})


def _slug(key: str, value) -> str:
    text = f"{key.split('.')[-1]}{value}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def expand(grid: Grid) -> list[Element]:
    """The cartesian product of the variants (if any) and the axes; each element's
    config is validated here."""
    keys = list(grid.axes)
    elements = []
    for variant, extra in (grid.variants.items() or [("", [])]):
        for values in itertools.product(*(grid.axes[k] for k in keys)):
            name = "_".join(([variant] if variant else []) + [_slug(k, v) for k, v in zip(keys, values)])
            out = os.path.join(grid.output_root, name)
            overrides = grid.overrides + list(extra) + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                                        for k, v in zip(keys, values)] + [f"run.output_dir={out}"]
            cfg = load_config(grid.config, overrides)  # fail before submitting anything
            elements.append(Element(name=name, output_dir=out, argv=["--config", grid.config] + overrides,
                                    variant=variant, config_hash=cfg.hash()))
    return elements


REUSED = "reused.json"  # in an element's folder: the equivalent finished run it stands for


def _recorded_hash(run_dir: str) -> str | None:
    """The config hash a finished run's metrics.json records (None: not finished)."""
    try:
        with open(os.path.join(run_dir, "metrics.json")) as fh:
            return json.load(fh).get("config_hash")
    except (OSError, ValueError, AttributeError):
        return None


def _hash_as_if_in(cfg, run_dir: str) -> str:
    """The hash of config `cfg` had its run.output_dir been run_dir."""
    probe = copy.deepcopy(cfg)
    probe.run.output_dir = run_dir
    return probe.hash()


def result_dir(e: Element) -> str:
    """Where the element's metrics.json is: its own folder, or the run it reuses."""
    try:
        with open(os.path.join(e.output_dir, REUSED)) as fh:
            return json.load(fh)["from"]
    except (OSError, ValueError, KeyError, TypeError):
        return e.output_dir


def finished(e: Element) -> bool:
    """The element's run wrote its metrics.json with the config it would run now, or the
    run it reuses did with the same config bar the folder (a rerun of the grid command
    skips it)."""
    where = result_dir(e)
    done = _recorded_hash(where)
    if done is None:
        return False
    return done == (e.config_hash if where == e.output_dir
                    else _hash_as_if_in(load_config(e.argv[1], e.argv[2:]), where))


def reuse_equivalent(grid: Grid, e: Element) -> str | None:
    """A finished run in a sibling grid folder with the element's configuration bar the
    output folder: recorded in the element's reused.json, and returned."""
    cfg = load_config(e.argv[1], e.argv[2:])
    for path in sorted(glob.glob(os.path.join(os.path.dirname(grid.output_root), "*", "*", "metrics.json"))):
        run_dir = os.path.dirname(path)
        if os.path.abspath(run_dir) == os.path.abspath(e.output_dir):
            continue
        if _recorded_hash(run_dir) == _hash_as_if_in(cfg, run_dir):
            os.makedirs(e.output_dir, exist_ok=True)
            with open(os.path.join(e.output_dir, REUSED), "w") as fh:
                jsonout.dump({"from": run_dir, "config_hash": e.config_hash}, fh, indent=1)
            return run_dir
    return None


class GridElement:
    """The callable submitit pickles: every task of the element runs pilot_hpc.main."""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def __call__(self) -> str:
        from pilot_hpc.main import EXIT_PREEMPTED, cli

        code = cli(self.argv)
        if code == EXIT_PREEMPTED:
            # Every rank checkpointed. Exiting 75 ends the srun step normally; the batch
            # script's teardown then requeues the element (REQUEUE_ON_75), which resumes
            # from the checkpoint. SystemExit (not an Exception) leaves no result file,
            # so submitit keeps waiting for the rerun.
            raise SystemExit(code)
        if code != 0:
            raise RuntimeError(f"pilot_hpc.main {' '.join(self.argv)} exited with code {code}")
        return os.path.join(_output_dir(self.argv), "metrics.json")

    def checkpoint(self, *args, **kwargs):
        """submitit's own timeout path (a signal before main's handlers exist): rerun as is."""
        import submitit

        return submitit.helpers.DelayedSubmission(GridElement(self.argv))


def _output_dir(argv: list[str]) -> str:
    return [a.split("=", 1)[1] for a in argv if a.startswith("run.output_dir=")][-1]


# Requeue from the batch script once srun has returned, not from inside the step: a
# step cancelled by `scontrol requeue` while its tasks run leaves its PMI2 socket
# behind (seen with Slurm 22.05), and the requeued step then hangs in MPI_Init.
REQUEUE_ON_75 = [
    "code=$?",
    'if [ "$code" -eq 75 ]; then echo "pilot_hpc: preempted; requeueing job $SLURM_JOB_ID"; '
    'scontrol requeue "$SLURM_JOB_ID"; fi',
    'exit "$code"',
]


def make_executor(grid: Grid):
    import submitit

    s = grid.slurm
    executor = submitit.SlurmExecutor(folder=os.path.join(grid.output_root, "submitit", "%j"),
                                      max_num_timeout=s.max_requeues)
    params = dict(job_name=f"pilot-{grid.name}", time=s.time_min, nodes=1, ntasks_per_node=s.ntasks,
                  cpus_per_task=s.cpus_per_task, signal_delay_s=s.signal_delay_s,
                  array_parallelism=s.array_parallelism, srun_args=["--mpi=pmi2"],
                  setup=["export PYTHONUNBUFFERED=1"] + list(s.setup), teardown=REQUEUE_ON_75)
    if s.gpus_per_task:
        params["gpus_per_task"] = s.gpus_per_task
    if s.partition:
        params["partition"] = s.partition
    executor.update_parameters(**params)
    return executor


def sbatch_text(grid: Grid) -> str:
    """The array script submitit will submit (submitit has no public renderer)."""
    executor = make_executor(grid)
    command = " ".join([sys.executable, "-u", "-m", "submitit.core._submit", str(executor.folder)])
    return executor._make_submission_file_text(command, "dry-run")


def submit(grid: Grid, elements: list[Element]) -> list:
    executor = make_executor(grid)
    with executor.batch():
        jobs = [executor.submit(GridElement(e.argv)) for e in elements]
    for e, job in zip(elements, jobs):
        print(f"submitted {e.name}: Slurm job {job.job_id} -> {e.output_dir}", flush=True)
    return jobs


def run_local(grid: Grid, elements: list[Element], ranks: int | None = None, parallel: int | None = None) -> int:
    """The same runs without Slurm: mpiexec -n ranks (the grid's slurm.ntasks by default)
    per element, at most `parallel` (the grid's local_parallel) at once. A run's numbers
    do not depend on its rank count (W = 1 and W = 9 are bitwise equal), so on a small
    machine `ranks=1, parallel=cores` trades no result for throughput: 9 ranks on 2 cores
    spend their time switching and polling."""
    mpiexec = find_mpiexec()
    ranks = grid.slurm.ntasks if ranks is None else ranks

    def one(e: Element) -> int:
        os.makedirs(e.output_dir, exist_ok=True)
        with open(os.path.join(e.output_dir, "launch.log"), "ab") as log:
            cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "pilot_hpc.main"] + e.argv
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{e.name}: exit {code} ({e.output_dir})", flush=True)
        return code

    with concurrent.futures.ThreadPoolExecutor(max(1, parallel or grid.local_parallel)) as pool:
        codes = list(pool.map(one, elements))
    return max(codes, default=0)


def collect(grid: Grid, elements: list[Element], group_by: str | None = None) -> str:
    """The grid's table (results.md) and plot (results.png) under output_root.

    Without group_by one row per run; with group_by (an axis, e.g. fl.strategy) one row
    per value of that axis, as mean ± std over the other axes (e.g. the seeds).
    """
    from pilot_hpc import report

    if group_by is not None:
        check_group_by(grid, group_by)
    groups: dict[str, list[dict]] = {}
    missing = []
    for e in elements:
        value = group_value(e, grid, group_by) if group_by else e.name
        docs = groups.setdefault(str(value), [])
        path = os.path.join(result_dir(e), "metrics.json")
        if os.path.isfile(path):
            docs.append(report.read_metrics(path))
        else:
            missing.append(e.name)
    if not any(groups.values()):
        return "no run of this grid has a metrics.json yet"
    table = report.comparison_table(groups)
    note = f"\n\nruns without metrics.json yet: {', '.join(missing)}" if missing else ""
    os.makedirs(grid.output_root, exist_ok=True)
    with open(os.path.join(grid.output_root, "results.md"), "w") as fh:
        fh.write(f"# grid {grid.name}: final metrics (x100){' by ' + group_by if group_by else ''}\n\n"
                 f"{table}{note}\n")
    report.comparison_plot(groups, os.path.join(grid.output_root, "results.png"), f"grid {grid.name}")
    return table + note


def check_group_by(grid: Grid, by: str) -> None:
    """A --group-by must name an axis of the grid, or "variant" when it has variants."""
    axes = list(grid.axes) + (["variant"] if grid.variants else [])
    if by not in axes:
        raise ConfigError(f"--group-by {by!r} is not an axis of grid {grid.name}: {axes}")


def group_value(e: Element, grid: Grid, by: str):
    """The element's value of axis `by` (or its variant's name)."""
    return {**dict(zip(grid.axes, axis_values(e, grid))), "variant": e.variant}[by]


def axis_values(e: Element, grid: Grid) -> list:
    overrides = dict(a.split("=", 1) for a in e.argv if "=" in a and not a.startswith("--"))
    return [overrides[k] for k in grid.axes]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = "collect" if argv[:1] == ["collect"] else "run"
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.launch", description=__doc__.split("\n")[0])
    ap.add_argument("--grid", required=True, help="grid YAML (configs/grids/*.yaml)")
    ap.add_argument("--group-by", default=None,
                    help="collect: an axis (e.g. fl.strategy), as mean ± std over the other axes")
    if command == "run":
        mode = ap.add_mutually_exclusive_group()
        mode.add_argument("--local", action="store_true", help="run the grid here with mpiexec, no Slurm")
        mode.add_argument("--dry-run", action="store_true", help="print the runs and the sbatch script only")
        mode.add_argument("--wait", action="store_true", help="submit, then wait for every element")
        ap.add_argument("--ranks", type=int, default=None,
                        help="--local: MPI ranks per run (default the grid's slurm.ntasks; the numbers do not "
                             "depend on it)")
        ap.add_argument("--parallel", type=int, default=None,
                        help="--local: runs at once (default the grid's local_parallel)")
    args = ap.parse_args(argv[1:] if command == "collect" else argv)
    try:
        grid = load_grid(args.grid)
        elements = expand(grid)
        if args.group_by is not None:
            check_group_by(grid, args.group_by)
    except ConfigError as err:
        print(f"pilot_hpc.launch: config error: {err}", file=sys.stderr)
        return 2
    if command == "collect":
        print(collect(grid, elements, args.group_by))
        return 0
    if (args.ranks is not None or args.parallel is not None) and not args.local:
        print("pilot_hpc.launch: --ranks and --parallel apply to --local runs only (on Slurm the grid's slurm "
              "section sizes each job)", file=sys.stderr)
        return 2
    if args.ranks is not None and args.ranks < 1 or args.parallel is not None and args.parallel < 1:
        print("pilot_hpc.launch: --ranks and --parallel must be >= 1", file=sys.stderr)
        return 2
    if args.dry_run:
        for e in elements:
            print(f"{e.name}: python -m pilot_hpc.main {' '.join(e.argv)}")
        print(sbatch_text(grid))
        return 0
    todo = [e for e in elements if not finished(e)]
    if len(todo) < len(elements):
        print(f"{len(elements) - len(todo)} of {len(elements)} runs already finished (metrics.json with the same "
              "config): skipped", flush=True)
    for e in list(todo):
        source = reuse_equivalent(grid, e)
        if source is not None:
            todo.remove(e)
            print(f"{e.name}: reuses {source} (the same configuration, finished by another grid)", flush=True)
    if args.local:
        code = run_local(grid, todo, args.ranks, args.parallel)
        print(collect(grid, elements, args.group_by))
        return code
    if not todo:
        print(collect(grid, elements, args.group_by))
        return 0
    jobs = submit(grid, todo)
    if args.wait:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        failed = 0
        for e, job in zip(todo, jobs):
            try:
                job.results()  # one result per MPI task (rank); all must succeed
                print(f"{e.name}: done", flush=True)
            except (FailedJobError, UncompletedJobError) as err:
                failed += 1
                print(f"{e.name}: failed: {err}", file=sys.stderr, flush=True)
        print(collect(grid, elements, args.group_by))
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
