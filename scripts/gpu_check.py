#!/usr/bin/env python3
"""One command that validates every GPU path of pilot_hpc on one GPU machine.

    python3 scripts/gpu_check.py --out DIR        (or GPU_CHECK_OUT=DIR; make gpu-check)
    python3 scripts/gpu_check.py --list           (the steps and their budgets; no GPU needed)

Runs from the repository root with the machine's own python3 (the project need not be
installed: src/, which holds pilot_hpc and pilot_hpc_kernels, goes on PYTHONPATH). Without a CUDA device it says so in one
line and exits 2 before doing anything. With one it runs STEPS in order, each under its
own timeout, goes on after a failed step, and writes into DIR:

    gpu_check.md       the summary: device, versions, commit, each step's result and numbers
    gpu_check.log      every step's full output, one section per step
    bench_ctmoa.md     the kernel benchmark at LLaVA-7B shapes (kernels/BENCHMARKS.md format)
    bench_exchange.md  the exchange/aggregation benchmark (BENCHMARKS.md format)
    realscale/         the real-scale round's JSON and Markdown, once that step exists

That is at most 6 files, 1 folder deep: within what the device machine sends back (8 files,
2 folders). gpu_check.md is rewritten after every step, so a run killed from outside still
leaves the steps done so far. Exit status: 0 every step passed or was skipped, 1 a step
failed, 2 no CUDA device.

Missing packages (mpich, datasets and its two missing dependencies) travel as wheels in
.gpu_wheels/ (`make gpu-wheels`); the setup step installs them with `pip --prefix` into a
temporary folder. Not `--target`: pip --target drops the data files of the mpich wheel's
lib/ folder, i.e. libmpi.so.12 itself, and mpi4py then finds no MPI library.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_check_lib beside this file
# (the tests read some of these names through this module)
from gpu_check_lib import (CAPTION_NOTE, Command, Context, FED_RANKS, KILL_GRACE_S, Step, StepResult, TOTAL_S, _read,
                           append_log, base_env, cmd_aggregation_bench, judge_aggregation_bench, judge_cuda_tests,
                           judge_exchange_bench, judge_federation, judge_kernel_bench, judge_kernel_tests,
                           judge_realscale, locate_prefix, parse_pytest_summary, plan_wheels,
                           returned_files_problem, run_command, tail, write_summary)

REPO = Path(__file__).resolve().parent.parent
EXIT_NO_CUDA = 2
# Kept back from the steps for start-up (nvidia-smi, git) and writing the summary.
RESERVE_S = 15
REALSCALE_MODULE = "pilot_hpc.tools.realscale_round"
# The benchmark module, found under either name (a checkout may still have it at the top).
BENCH_MODULES = ("pilot_hpc.tools.bench", "pilot_hpc.bench")
# Federation: FED_RANKS ranks share the one GPU (resolve_device gives every rank cuda:0).
# Only VQA and grounding clients (CAPTION_NOTE says why).
FED_OVERRIDES = [
    "run.device=cuda", "model.dtype=bfloat16", "model.ctmoa_impl=triton", "run.resume=never",
    "fl.num_clients=4", "fl.client_tasks=[vqa, vqa, grounding, grounding]",
    "fl.task_metrics={vqa: vqa_accuracy, grounding: iou@0.5}", "pilot.top_m=2",
    # Two rounds: round 1 is stage 1 (task adapters), round 2 stage 2, the one that goes
    # through CT-MoA and so through the Triton kernels.
    "fl.rounds=2",
    "data.train_min=32", "data.train_max=48", "data.eval_samples=8",
    "pretrain.steps=20", "pretrain.samples=120",
    "train.max_steps=4", "train.batch_size=8", "train.eval_batch_size=8", "train.max_new_tokens=12",
]


# ------------------------------------------------------------------------- gates


def module_file(module: str, roots: list[Path]) -> Path | None:
    """The source file of module (a.b.c -> a/b/c.py or a/b/c/__init__.py) under one of
    roots, found without importing anything (a module that fails to import is the step's
    failure to report, not a reason to skip it)."""
    rel = Path(*module.split("."))
    for root in roots:
        for cand in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
            if cand.is_file():
                return cand
    return None


def needs_mpi(ctx: Context) -> str | None:
    # None (setup not run yet) counts as a go: the scheduler then keeps the step's budget back.
    return None if ctx.mpi_ok is not False else f"needs MPI, and MPI does not work here: {ctx.mpi_reason}"


def gate_exchange(ctx: Context) -> str | None:
    if not any(module_file(m, [ctx.repo / "src"]) for m in BENCH_MODULES):
        return f"neither {' nor '.join(BENCH_MODULES)} exists under src/"
    return needs_mpi(ctx)


def gate_federation(ctx: Context) -> str | None:
    if (why := needs_mpi(ctx)) is not None:
        return why
    if ctx.datasets_ok is False:
        return f"pilot_hpc.main imports `datasets` (main.setup_logging, data/records.py): {ctx.datasets_reason}"
    return None


def gate_realscale(ctx: Context) -> str | None:
    if module_file(REALSCALE_MODULE, [ctx.repo / "src"]) is None:
        return f"real-scale training is not in this checkout: no module {REALSCALE_MODULE} under src/"
    return None


def gate_file(rel: str) -> Callable[[Context], str | None]:
    return lambda ctx: None if (ctx.repo / rel).is_file() else f"{rel} not found in the tree"


# ------------------------------------------------------------------------- commands


def pytest_argv(ctx: Context, *args: str, workers: int = 0) -> list[str]:
    argv = [ctx.python, "-m", "pytest", "-q", "-rs", *args]
    if workers and importlib.util.find_spec("xdist") is not None:  # pytest-xdist is on the GPU image
        argv += ["-n", str(workers)]
    return argv


def cmd_kernel_tests(ctx: Context) -> Command:
    # 8 workers compile the Triton kernels' autotune configs in parallel: the compiles (one
    # core each; the machine has 16), not the GPU, bound these tests.
    return Command(pytest_argv(ctx, "kernels", workers=8))


_CUDA_MARK = re.compile(r"^\s*(@pytest\.mark\.cuda\b|pytestmark\s*=.*\bpytest\.mark\.cuda\b)|"
                        r"\bmarks\s*=.*\bpytest\.mark\.cuda\b", re.M)


def cuda_marked(repo: Path) -> list[str]:
    """Test files under tests/ that mark a test (a decorator, pytestmark, or a param's
    marks=) with pytest.mark.cuda; a mere mention in a string or comment does not count."""
    return sorted(str(p.relative_to(repo)) for p in (repo / "tests").rglob("*.py")
                  if _CUDA_MARK.search(p.read_text(errors="replace")))


def cmd_cuda_tests(ctx: Context) -> Command:
    # tests/ only: kernels/ ran whole in kernel_tests. Selected by the `cuda` marker (the
    # files are moving into tests/unit, tests/mpi, tests/e2e); until a test carries it,
    # by name. --continue-on-collection-errors: one module that cannot be imported here
    # must not hide the CUDA tests of the others (the errors still fail the step).
    select = ["-m", "cuda"] if cuda_marked(ctx.repo) else ["-k", "cuda"]
    return Command(pytest_argv(ctx, "tests", *select, "--continue-on-collection-errors"))


def cmd_kernel_bench(ctx: Context) -> Command:
    out = ctx.out / "bench_ctmoa.md"
    return Command([ctx.python, "-m", "pilot_hpc_kernels.benchmark_ctmoa", "--out", str(out)], outputs=[out])


def cmd_exchange_bench(ctx: Context) -> Command:
    out = ctx.out / "bench_exchange.md"
    return Command([ctx.python, str(Path(__file__).resolve()), "--exchange-bench", str(out)], outputs=[out])


def fed_argv(ctx: Context) -> list[str]:
    mpiexec = shutil.which("mpiexec", path=ctx.env.get("PATH")) or "mpiexec"
    return [mpiexec, "-n", str(FED_RANKS), ctx.python, "-m", "pilot_hpc.main",
            "--config", str(ctx.repo / "configs" / "smoke_9client.yaml"),
            f"run.output_dir={ctx.work / 'federation'}", f"run.cache_dir={ctx.work / 'cache'}", *FED_OVERRIDES]


def cmd_federation(ctx: Context) -> Command:
    return Command(fed_argv(ctx))


def cmd_realscale(ctx: Context) -> Command:
    out = ctx.work / "realscale"
    return Command([ctx.python, "-m", REALSCALE_MODULE, "--out", str(out)], outputs=[out])


def cmd_families(ctx: Context) -> Command:
    out = ctx.work / "families"
    return Command([ctx.python, "-m", REALSCALE_MODULE, "--out", str(out), "--family", "all", "--steps", "6"],
                   outputs=[out])


# ------------------------------------------------------------------------- the steps

STEP_BUDGETS = {  # seconds; see STEPS for what each buys
    "setup": 30,
    "kernel_tests": 110,
    "cuda_tests": 40,
    "kernel_bench": 110,
    "exchange_bench": 70,
    "federation": 70,
    "realscale": 30,
}

STEPS: list[Step] = [
    Step("setup", STEP_BUDGETS["setup"],
         "install the travelling wheels (pip --prefix into a temporary folder), then probe: versions, "
         "`import datasets`, and `mpiexec -n 2` with mpi4py",
         gate=lambda ctx: None, command=None, judge=None),
    Step("kernel_tests", STEP_BUDGETS["kernel_tests"],
         "pytest kernels/ on the GPU: the Triton kernels compiled (not interpreted), fp32, fp16 and bf16",
         gate=lambda ctx: None, command=cmd_kernel_tests, judge=judge_kernel_tests),
    Step("cuda_tests", STEP_BUDGETS["cuda_tests"],
         "the CUDA tests under tests/ (pytest -m cuda): the streamed exchange's pinned staging and on-device mixing",
         gate=lambda ctx: None, command=cmd_cuda_tests, judge=judge_cuda_tests),
    Step("kernel_bench", STEP_BUDGETS["kernel_bench"],
         "python -m pilot_hpc_kernels.benchmark_ctmoa at the LLaVA-7B shapes (bf16): table and verdicts",
         gate=gate_file("src/pilot_hpc_kernels/benchmark_ctmoa.py"), command=cmd_kernel_bench, judge=judge_kernel_bench),
    Step("exchange_bench", STEP_BUDGETS["exchange_bench"],
         "the exchange/aggregation benchmark at 7B sizes: 9-rank streamed exchange, pingpong, and the server's "
         "mixing on the GPU (smoke rounds left out)",
         gate=gate_exchange, command=cmd_exchange_bench, judge=judge_exchange_bench),
    Step("federation", STEP_BUDGETS["federation"],
         f"mpiexec -n {FED_RANKS} python -m pilot_hpc.main: run.device=cuda model.dtype=bfloat16 "
         "model.ctmoa_impl=triton, 4 VQA/grounding clients, 2 rounds, every rank on the one GPU",
         gate=gate_federation, command=cmd_federation, judge=judge_federation),
    Step("realscale", STEP_BUDGETS["realscale"],
         f"python -m {REALSCALE_MODULE}: one reduced-depth LLaVA-7B-width client round with activation "
         "checkpointing; tokens/s and peak memory next to the memory planner's estimate",
         gate=gate_realscale, command=cmd_realscale, judge=judge_realscale),
]


# On request only (--steps families, --steps aggregation_bench): the whole check already fills
# its 8 minutes, so these are calls of their own (README, "GPU check").
EXTRA_STEPS: list[Step] = [
    Step("families", 240,
         f"python -m {REALSCALE_MODULE} --family all: one reduced-depth real-width round per model family "
         "(its processor and chat template), tokens/s, useful TFLOP/s and MFU, peak memory next to the planner's",
         gate=gate_realscale, command=cmd_families, judge=lambda rc, text, ctx, cmd: judge_realscale(
             rc, text, ctx, cmd, name="families")),
    Step("aggregation_bench", 120,
         "python -m pilot_hpc.tools.bench_codecs and bench_product --device cuda: codec encode/decode of one "
         "LLaVA-7B client row against a copy, and the product-distance Gram pass against the flat one",
         gate=lambda ctx: None, command=cmd_aggregation_bench, judge=judge_aggregation_bench),
]


def step_timeout(now_s: float, later_budgets: int, total_s: int = TOTAL_S, reserve_s: int = RESERVE_S) -> float:
    """Seconds the next step may run: whatever is left of the total once the later steps'
    budgets are kept back. A step so gets its own budget plus what earlier steps saved,
    and never eats into a later step's budget."""
    return max(0.0, total_s - reserve_s - now_s - later_budgets)


# ------------------------------------------------------------------------- running


def execute(step: Step, ctx: Context, timeout: float) -> StepResult:
    """Run one step (its gate said go) and judge it; the log goes to work/<name>.log."""
    cmd = step.command(ctx)
    # MPICH's own limit, for every mpiexec inside the step: a hung collective ends its job
    # even if this script were killed first.
    cmd.env.setdefault("MPIEXEC_TIMEOUT", str(max(1, int(timeout))))
    log_path = ctx.work / f"{step.name}.log"
    rc, wall = run_command(cmd, ctx.env, ctx.repo, timeout, log_path)
    text = _read(log_path)
    res = step.judge(rc, text, ctx, cmd)
    if rc == -9:
        res.status, res.reason = "fail", f"timeout after {timeout:.0f} s (budget {step.budget_s} s)"
    res.wall_s, res.budget_s = wall, step.budget_s
    if res.status == "fail":
        res.log_tail = tail(text)
    return res


def probe(ctx: Context, argv: list[str], timeout: float, log) -> tuple[int, str]:
    """(exit status, output) of one setup probe, its output also into the setup log. Run
    like a step (a session of its own), so that a hung `mpiexec` goes with its ranks."""
    probe_log = ctx.work / "probe.log"
    rc, _ = run_command(Command(argv), ctx.env, ctx.repo, timeout, probe_log)
    text = _read(probe_log)
    log.write(text + f"[exit {rc}]\n")
    return rc, text


_VERSION_PROBE = r"""
import importlib.metadata as md, json, sys
out = {"python": sys.version.split()[0]}
for name in ("torch", "triton", "transformers", "peft", "mpi4py", "h5py", "numpy", "datasets", "pyarrow",
             "fsspec", "huggingface-hub", "dill", "multiprocess", "mpich", "pytest", "pytest-xdist"):
    try:
        out[name] = md.version(name)
    except md.PackageNotFoundError:
        out[name] = "not installed"
try:
    import datasets
    out["datasets import"] = "ok"
except Exception as err:
    out["datasets import"] = f"{type(err).__name__}: {err}"
try:
    import torch
except Exception as err:
    torch = None
    out["torch import"] = f"{type(err).__name__}: {err}"
if torch is not None:
    out["torch cuda"] = str(torch.version.cuda)
if torch is not None and torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out["device"] = p.name
    out["device memory GiB"] = f"{p.total_memory / 2**30:.1f}"
    out["compute capability"] = f"{p.major}.{p.minor}"
    out["devices"] = str(torch.cuda.device_count())
print("VERSIONS " + json.dumps(out))
"""

# One write per rank (print of several arguments writes each apart, and under mpiexec
# the ranks' pieces interleave); the marks are then found anywhere in the output.
_MPI_PROBE = ("import sys; from mpi4py import MPI; c = MPI.COMM_WORLD; "
              "lib = ' '.join(MPI.Get_library_version().split()[:3]).replace(']', ')'); "
              "sys.stdout.write(f'mpi-probe {c.rank}/{c.size} [{lib}]' + chr(10)); sys.stdout.flush()")
_MPI_MARK = re.compile(r"mpi-probe (\d+)/2 \[([^\]]*)\]")


def run_setup(step: Step, ctx: Context, timeout: float, environ: dict[str, str]) -> StepResult:
    """Wheels -> environment -> probes. Fills ctx.env, ctx.facts, ctx.mpi_*, ctx.datasets_*."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    res = StepResult("setup", "pass", budget_s=step.budget_s)
    problems: list[str] = []
    log_path = ctx.work / "setup.log"
    with open(log_path, "w") as log:
        wheels, wheel_problems = plan_wheels(ctx.wheel_dir)
        problems += wheel_problems
        prefix = ctx.work / "wheels"
        located: dict[str, Path | None] = {}
        if wheels and not wheel_problems:
            # --ignore-installed: pip --prefix otherwise skips a package the interpreter already
            # has in the same version, and the prefix would then miss what it was told to hold.
            argv = [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--disable-pip-version-check", "--ignore-installed", "--prefix", str(prefix),
                    *map(str, wheels)]
            ctx.env = dict(environ)
            rc, out = probe(ctx, argv, max(1.0, deadline - time.monotonic()), log)
            if rc != 0:
                problems.append(f"pip install of {len(wheels)} wheel(s) from {ctx.wheel_dir} failed: {tail(out, 3)}")
            else:
                located = locate_prefix(prefix)
                res.numbers["wheels"] = ", ".join(w.name.split("-")[0] + " " + w.name.split("-")[1] for w in wheels)
        ctx.env = base_env(ctx, located, environ)
        res.command = f"pip install --no-index --no-deps --prefix {prefix} {ctx.wheel_dir}/*.whl; probes"

        rc, out = probe(ctx, [ctx.python, "-c", _VERSION_PROBE], max(1.0, min(60.0, deadline - time.monotonic())), log)
        found = re.search(r"^VERSIONS (\{.*\})$", out, re.M)
        if found:
            ctx.facts.update(json.loads(found.group(1)))
        else:
            problems.append(f"the version probe failed (exit {rc}): {tail(out, 3)}")
        if ctx.facts.get("datasets import") == "ok":
            ctx.datasets_ok, ctx.datasets_reason = True, ""
        else:
            ctx.datasets_ok = False
            ctx.datasets_reason = f"`import datasets` fails: {ctx.facts.get('datasets import', 'not probed')}"
            problems.append(ctx.datasets_reason)

        mpiexec = shutil.which("mpiexec", path=ctx.env.get("PATH"))
        if mpiexec is None:
            ctx.mpi_ok = False
            ctx.mpi_reason = "mpiexec not found on PATH (no MPI on this machine, and no mpich wheel installed)"
        else:
            rc, out = probe(ctx, [mpiexec, "-n", "2", ctx.python, "-c", _MPI_PROBE],
                            max(1.0, min(45.0, deadline - time.monotonic())), log)
            marks = _MPI_MARK.findall(out)
            ctx.mpi_ok = rc == 0 and sorted(r for r, _ in marks) == ["0", "1"]
            if ctx.mpi_ok:
                ctx.facts["MPI library"] = marks[0][1].strip() or "?"
                ctx.mpi_reason = ""
                res.numbers["MPI probe"] = f"2 ranks, {ctx.facts['MPI library']}"
            else:
                ctx.mpi_reason = f"`mpiexec -n 2 python -c 'from mpi4py import MPI'` failed (exit {rc}): {tail(out, 3)}"
        if not ctx.mpi_ok:
            problems.append(ctx.mpi_reason)
        for key in ("PATH", "LD_LIBRARY_PATH", "MPI4PY_LIBMPI", "PYTHONPATH"):
            log.write(f"env {key}={ctx.env.get(key, '')}\n")
    res.wall_s = time.monotonic() - t0
    if problems:
        res.status, res.reason = "fail", "; ".join(problems)
        res.log_tail = tail(_read(log_path))
    shown = [f"- `{k}={ctx.env[k]}`" for k in ("PYTHONPATH", "LD_LIBRARY_PATH", "MPI4PY_LIBMPI",
                                                 "MPIR_CVAR_ENABLE_GPU") if k in ctx.env]
    shown.append(f"- `PATH` starts with `{ctx.env.get('PATH', '').split(os.pathsep)[0]}`")
    res.tables.append("Environment of the steps (on top of the caller's):\n\n" + "\n".join(shown))
    return res


# ------------------------------------------------------------------------- entry points


def no_cuda_reason(environ: dict[str, str]) -> str | None:
    """Why there is no CUDA device, or None if there is one. The cheap signs first (no
    torch import); torch only where a driver seems present."""
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU"
    if not shutil.which("nvidia-smi", path=environ.get("PATH")) and not glob.glob("/dev/nvidia[0-9]*") \
            and not os.path.exists("/proc/driver/nvidia"):
        return "no NVIDIA driver: no nvidia-smi on PATH, no /dev/nvidia*, no /proc/driver/nvidia"
    try:
        import torch
    except ImportError as err:
        return f"torch cannot be imported ({err})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def git_commit(repo: Path, environ: dict[str, str]) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip()[:12] + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    # The device machine gets a copy of the working tree, without .git.
    given = environ.get("GPU_CHECK_COMMIT")
    return f"{given} (from GPU_CHECK_COMMIT; no git here)" if given else \
        "unknown (no git here: pass GPU_CHECK_COMMIT=<hash> to record it)"


def nvidia_smi_facts() -> dict[str, str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if not out:
        return {}
    parts = [p.strip() for p in out[0].split(",")]
    return {"driver": parts[1]} if len(parts) >= 2 else {}


def select_steps(only: str | None) -> list[Step]:
    """All steps, or setup plus the named ones (a rerun of what failed, in order)."""
    if not only:
        return list(STEPS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    every = STEPS + EXTRA_STEPS
    unknown = sorted(set(names) - {s.name for s in every})
    if unknown:
        raise SystemExit(f"gpu_check: --steps: unknown step(s) {unknown}; steps: {[s.name for s in every]}")
    return [s for s in every if s.name == "setup" or s.name in names]


def list_steps() -> str:
    rows = [f"{s.name:15s} {s.budget_s:4d} s  {s.what}" for s in STEPS]
    total = sum(s.budget_s for s in STEPS)
    extra = [f"{s.name:15s} {s.budget_s:4d} s  (on request: --steps {s.name}) {s.what}" for s in EXTRA_STEPS]
    return "\n".join(rows + [f"{'total':15s} {total:4d} s  (+ {RESERVE_S} s reserve; the whole stays under "
                                     f"{TOTAL_S} s wall)"] + extra)


def run_check(out: Path, wheel_dir: Path, only: str | None, environ: dict[str, str]) -> int:
    t_start = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python3 scripts/gpu_check.py " + " ".join(sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(repo=REPO, out=out, work=work, wheel_dir=wheel_dir, env=dict(environ))
    ctx.facts.update(nvidia_smi_facts())
    ctx.facts["commit"] = git_commit(REPO, environ)
    combined = out / "gpu_check.log"
    combined.write_text(f"gpu_check started {started}; work folder {work}\n")
    steps = select_steps(only)
    results: list[StepResult] = []

    def summary(pending: list[Step]) -> None:
        write_summary(out / "gpu_check.md", results, ctx.facts, pending, started, time.monotonic() - t_start, command)

    for i, step in enumerate(steps):
        later = sum(s.budget_s for s in steps[i + 1:] if s.gate(ctx) is None)
        timeout = step_timeout(time.monotonic() - t_start, later)
        print(f"gpu_check: step {step.name} (budget {step.budget_s} s, may run {timeout:.0f} s) ...", flush=True)
        skip = step.gate(ctx)
        if skip is not None:
            res = StepResult(step.name, "skipped", reason=skip, budget_s=step.budget_s)
        elif timeout < 5:
            res = StepResult(step.name, "skipped", budget_s=step.budget_s,
                             reason=f"no time left ({timeout:.0f} s) inside the {TOTAL_S} s total")
        else:
            t0 = time.monotonic()
            try:
                res = run_setup(step, ctx, timeout, environ) if step.command is None else execute(step, ctx, timeout)
            except Exception as err:  # a bug here must not cost the other steps their run
                res = StepResult(step.name, "fail", reason=f"gpu_check itself failed: {type(err).__name__}: {err}",
                                 budget_s=step.budget_s, wall_s=time.monotonic() - t0,
                                 log_tail=tail(traceback.format_exc()))
                if step.command is None:
                    ctx.mpi_ok = ctx.mpi_ok or False
                    ctx.datasets_ok = ctx.datasets_ok or False
                    ctx.mpi_reason = ctx.datasets_reason = "the setup step failed (see its entry)"
            append_log(combined, step.name, work / f"{step.name}.log")
        results.append(res)
        print(f"gpu_check: step {step.name}: {res.status}" + (f" ({res.reason})" if res.reason else "") +
              f" [{res.wall_s:.1f} s]", flush=True)
        summary(steps[i + 1:])
    problem = returned_files_problem(out)
    if problem:
        results[-1].notes.append(f"the output folder breaks the return limits: {problem}")
        summary([])
    failed = [r.name for r in results if r.status == "fail"]
    skipped = [r.name for r in results if r.status == "skipped"]
    print(f"gpu_check: {len(results) - len(failed) - len(skipped)} passed, {len(failed)} failed {failed}, "
          f"{len(skipped)} skipped {skipped}; {time.monotonic() - t_start:.0f} s; summary: {out / 'gpu_check.md'}",
          flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def exchange_bench_main(out_md: str, ranks: int = 9, repeat: int = 2, device: str = "cuda", scale: int = 1) -> int:
    """The exchange/aggregation benchmark at 7B sizes with the server's mixing on the GPU,
    without its two smoke rounds (they run caption clients, whose CIDEr needs
    pycocoevalcap, and take minutes). Calls the benchmark's own functions; if they have
    changed, falls back to its CLI with --quick and says so (QUICK FALLBACK). device and
    scale (sizes / scale) exist for the CPU test of this driver."""
    import importlib
    import inspect

    import torch

    # The first of the names whose file is in this tree: an installed pilot_hpc elsewhere
    # (an editable install of another checkout, say) must not be what gets measured.
    name = next((m for m in BENCH_MODULES if module_file(m, [REPO / "src"])), None)
    if name is None:
        print(f"gpu_check: none of {BENCH_MODULES} exists under {REPO / 'src'}", file=sys.stderr)
        return 3
    mod = importlib.import_module(name)
    print(f"gpu_check: exchange benchmark from {mod.__name__} ({mod.__file__})", flush=True)
    problems = [p for p in ("exchange", "pingpong", "aggregation", "report", "P_VISUAL_7B", "P_TEXT_7B")
                if not hasattr(mod, p)]
    if not problems:
        for fn, args in ((mod.exchange, (ranks, 1, 1, 64.0, repeat)), (mod.pingpong, (1,)),
                         (mod.aggregation, (ranks, 1, 1, 64.0, torch.device(device), repeat)),
                         (mod.report, ({}, (1, 1.0), {}, None, ""))):
            try:
                inspect.signature(fn).bind(*args)
            except TypeError as err:
                problems.append(f"{fn.__name__}: {err}")
    if problems:
        print(f"gpu_check: QUICK FALLBACK: {mod.__name__} lacks or changed {problems}; running its CLI with --quick "
              "(sizes / 100)", flush=True)
        return mod.main(["--quick", "--device", device, "--ranks", str(ranks), "--out", out_md])
    visual, text, chunk_mb = mod.P_VISUAL_7B // scale, mod.P_TEXT_7B // scale, 64.0 / scale
    ex = mod.exchange(ranks, visual, text, chunk_mb, repeat)
    ping = mod.pingpong(ex["chunk_bytes"])
    print(f"exchange {ex}\npingpong {ping[1] / 1e9:.2f} GB/s at {ping[0]} B", flush=True)
    agg = mod.aggregation(ranks, visual, text, chunk_mb, torch.device(device), repeat)
    print(f"aggregation {agg}", flush=True)
    size = "7B sizes" if scale == 1 else f"7B sizes / {scale}"
    command = (f"python3 scripts/gpu_check.py (exchange_bench: {mod.__name__}'s exchange, pingpong and aggregation "
               f"at {size}, {ranks} ranks, repeat {repeat}, mixing on {device}, smoke rounds left out)")
    md = mod.report(ex, ping, agg, None, command)
    Path(out_md).write_text(md)
    print(md, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 scripts/gpu_check.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT"),
                    help="folder for gpu_check.md, gpu_check.log and the benchmark files (default: $GPU_CHECK_OUT)")
    ap.add_argument("--wheels", default=os.environ.get("GPU_CHECK_WHEELS", str(REPO / ".gpu_wheels")),
                    help="the travelling wheel folder (make gpu-wheels; default .gpu_wheels)")
    ap.add_argument("--steps", default=None, help="comma-separated steps to run (setup always runs); default all")
    ap.add_argument("--list", action="store_true", help="print the steps and their budgets, and exit")
    ap.add_argument("--exchange-bench", metavar="FILE", help=argparse.SUPPRESS)  # the exchange step's driver
    args = ap.parse_args(argv)
    if args.list:
        print(list_steps())
        return 0
    if args.exchange_bench:
        return exchange_bench_main(args.exchange_bench)
    why = no_cuda_reason(dict(os.environ))
    if why is not None:
        print(f"gpu_check: no CUDA device here ({why}); nothing was run (exit 2). "
              "Run it on a GPU machine: README.md, section GPU check.", file=sys.stderr)
        return EXIT_NO_CUDA
    if not args.out:
        ap.error("--out DIR (or GPU_CHECK_OUT) is required")
    select_steps(args.steps)  # a bad --steps fails now, not after setup
    return run_check(Path(args.out).resolve(), Path(args.wheels).resolve(), args.steps, dict(os.environ))


if __name__ == "__main__":
    sys.exit(main())
