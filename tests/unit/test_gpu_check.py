"""The CPU side of scripts/gpu_check.py: the no-CUDA exit, the step list and
its time budget, the skip logic, the parsers and the summary writer. Nothing here runs
on, or claims anything about, a GPU."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


g = _load()
NO_GPU_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # hides any GPU, so these run the same on a GPU box


def ctx_for(tmp_path: Path, **kw):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return g.Context(repo=kw.pop("repo", REPO), out=tmp_path / "out", work=work,
                     wheel_dir=kw.pop("wheel_dir", tmp_path / "wheels"), **kw)


# ----------------------------------------------------------------------- no CUDA


def test_no_cuda_prints_one_line_and_exits_2_at_once(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], env=NO_GPU_ENV,
                          capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device here"), lines
    assert not (tmp_path / "out").exists()  # nothing was run, nothing written
    assert time.monotonic() - t0 < 30


def test_no_cuda_reason_without_a_driver_does_not_need_torch(tmp_path):
    # No nvidia-smi on an empty PATH: the answer comes before torch would be imported.
    if os.path.exists("/proc/driver/nvidia") or list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("an NVIDIA driver is present here")
    why = g.no_cuda_reason({"PATH": str(tmp_path)})
    assert why is not None and "no nvidia-smi" in why


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_without_cuda_exits_2(tmp_path):
    proc = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}", f"GPU_CHECK_OUT={tmp_path / 'o'}"],
                          cwd=REPO, env=NO_GPU_ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check: no CUDA device here" in proc.stderr


def test_list_runs_anywhere_and_names_every_step():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--list"], env=NO_GPU_ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for step in g.STEPS:
        assert step.name in proc.stdout
    assert f"under {g.TOTAL_S} s" in proc.stdout


# ----------------------------------------------------------------------- the step list and its time


def test_step_list_covers_issue_17_in_order():
    assert [s.name for s in g.STEPS] == ["setup", "kernel_tests", "cuda_tests", "kernel_bench", "exchange_bench",
                                         "federation", "realscale"]
    assert {s.name: s.budget_s for s in g.STEPS} == g.STEP_BUDGETS
    assert all(s.budget_s > 0 and s.what for s in g.STEPS)


def test_budgets_fit_in_8_minutes():
    assert g.TOTAL_S <= 8 * 60
    assert sum(s.budget_s for s in g.STEPS) + g.RESERVE_S <= g.TOTAL_S


def test_every_step_running_to_its_timeout_still_ends_in_time():
    # Worst case: each step runs until it is killed (the kill is inside its timeout).
    now = 1.0  # start-up (nvidia-smi, git)
    for i, step in enumerate(g.STEPS):
        timeout = g.step_timeout(now, sum(s.budget_s for s in g.STEPS[i + 1:]))
        assert timeout >= step.budget_s - 1, step.name  # each keeps (about) its own budget
        now += timeout + 1  # the wait's own slack
    assert now <= g.TOTAL_S


def test_time_saved_by_a_step_goes_to_the_next():
    later = sum(s.budget_s for s in g.STEPS[2:])
    assert g.step_timeout(0.0, later) - g.step_timeout(g.STEPS[0].budget_s, later) == g.STEPS[0].budget_s
    assert g.step_timeout(10_000.0, 0) == 0.0


def test_steps_selects_setup_plus_the_named_ones_and_refuses_unknown_names():
    assert [s.name for s in g.select_steps("federation,kernel_tests")] == ["setup", "kernel_tests", "federation"]
    with pytest.raises(SystemExit, match="unknown step"):
        g.select_steps("kernel_test")


# ----------------------------------------------------------------------- skip logic


def test_realscale_is_skipped_until_its_module_exists(tmp_path):
    ctx = ctx_for(tmp_path, repo=tmp_path)
    assert "real-scale training is not in this checkout" in g.gate_realscale(ctx)
    mod = tmp_path / "src" / "pilot_hpc" / "tools" / "realscale_round.py"
    mod.parent.mkdir(parents=True)
    mod.write_text("")
    assert g.gate_realscale(ctx) is None


def test_mpi_steps_are_skipped_with_the_reason_when_mpi_does_not_work(tmp_path):
    ctx = ctx_for(tmp_path, mpi_ok=False, mpi_reason="mpiexec not found on PATH")
    for gate in (g.gate_exchange, g.gate_federation):
        assert gate(ctx) == "needs MPI, and MPI does not work here: mpiexec not found on PATH"
    ctx.mpi_ok, ctx.datasets_ok, ctx.datasets_reason = True, False, "`import datasets` fails: no module"
    assert g.gate_exchange(ctx) is None
    assert "imports `datasets`" in g.gate_federation(ctx)


def test_missing_wheel_folder_fails_setup_loudly_and_skips_the_mpi_steps(tmp_path, monkeypatch):
    empty_bin = tmp_path / "bin"  # a PATH with no mpiexec on it
    empty_bin.mkdir()
    monkeypatch.setattr(g, "STEPS", [s for s in g.STEPS if s.name in ("setup", "federation")])
    # The real version probe imports torch and datasets (seconds); the wheels are the point here.
    monkeypatch.setattr(g, "_VERSION_PROBE", 'print(\'VERSIONS {"datasets import": "ok"}\')')
    environ = {"PATH": str(empty_bin), "HOME": str(tmp_path)}
    rc = g.run_check(tmp_path / "out", tmp_path / "no_wheels", None, environ)
    assert rc == 1
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| setup | fail: wheel folder" in md and "make gpu-wheels" in md
    assert "**federation: SKIPPED**: needs MPI, and MPI does not work here: mpiexec not found on PATH" in md
    assert "===== step setup =====" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_mpi_probe_marks_are_found_even_when_mpiexec_joins_the_ranks_lines():
    joined = "mpi-probe 1/2 [MPICH Version: 5.0.2]mpi-probe 0/2 [MPICH Version: 5.0.2]\n"
    assert g._MPI_MARK.findall(joined) == [("1", "MPICH Version: 5.0.2"), ("0", "MPICH Version: 5.0.2")]


def test_two_versions_of_one_wheel_are_named(tmp_path):
    for name in ("mpich-5.0.2-py3-none-manylinux_2_28_x86_64.whl", "mpich-4.3.0-py3-none-manylinux_2_28_x86_64.whl",
                 "datasets-5.2.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    wheels, problems = g.plan_wheels(tmp_path)
    assert len(wheels) == 3 and len(problems) == 1
    assert problems[0].startswith("2 wheels of mpich") and "keep one" in problems[0]
    assert g.plan_wheels(tmp_path / "absent")[1][0].startswith(f"wheel folder {tmp_path / 'absent'} not found")


def test_environment_points_mpi4py_at_the_wheel_libmpi(tmp_path):
    prefix = tmp_path / "prefix"
    for rel in ("lib/python3.12/site-packages/mpich-5.0.2.dist-info/METADATA", "bin/mpiexec", "lib/libmpi.so.12"):
        (prefix / rel).parent.mkdir(parents=True, exist_ok=True)
        (prefix / rel).write_text("")
    located = g.locate_prefix(prefix)
    assert located == {"site": prefix / "lib/python3.12/site-packages", "bin": prefix / "bin",
                       "libmpi": prefix / "lib/libmpi.so.12"}
    ctx = ctx_for(tmp_path)
    env = g.base_env(ctx, located,
                     {"PATH": "/usr/bin", "TRITON_INTERPRET": "1", "LD_LIBRARY_PATH": "/opt/x"})
    assert env["MPI4PY_LIBMPI"] == str(prefix / "lib/libmpi.so.12")
    assert env["LD_LIBRARY_PATH"] == f"{prefix / 'lib'}{os.pathsep}/opt/x"
    assert env["PATH"].split(os.pathsep)[0] == str(prefix / "bin")
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(REPO / "src"), str(prefix / "lib/python3.12/site-packages")]
    assert "TRITON_INTERPRET" not in env  # the kernels are compiled, never interpreted
    assert (REPO / "src" / "pilot_hpc_kernels" / "ctmoa.py").is_file()  # src/ holds the kernels package too


def test_this_repo_has_no_cuda_mark_yet_and_this_file_does_not_count():
    # When someone marks the CUDA tests, this flips: then cuda_tests selects by marker.
    assert "tests/unit/test_gpu_check.py" not in g.cuda_marked(REPO)


def test_cuda_tests_use_the_marker_once_a_test_carries_it(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("# not a mark: pytest.mark.cuda\nX = '@pytest.mark.cuda'\n")
    ctx = ctx_for(tmp_path, repo=tmp_path)
    argv = g.cmd_cuda_tests(ctx).argv
    assert argv[argv.index("tests") + 1:argv.index("tests") + 3] == ["-k", "cuda"]
    (tmp_path / "tests" / "test_y.py").write_text("import pytest\n@pytest.mark.cuda\ndef test_b():\n    pass\n")
    argv = g.cmd_cuda_tests(ctx).argv
    assert argv[argv.index("tests") + 1:argv.index("tests") + 3] == ["-m", "cuda"]


# ----------------------------------------------------------------------- parsers and judges


@pytest.mark.parametrize("line,want", [
    ("42 passed, 3 skipped in 81.20s (0:01:21)", {"passed": 42, "skipped": 3, "seconds": 81.2}),
    ("==== 1 failed, 2 passed, 1 error, 4 warnings in 5.01s ====",
     {"failed": 1, "passed": 2, "errors": 1, "warnings": 4, "seconds": 5.01}),
    ("1 passed, 2 deselected in 0.40s", {"passed": 1, "deselected": 2, "seconds": 0.4}),
    ("no tests ran in 0.12s", {"seconds": 0.12}),
])
def test_pytest_summary_parser(line, want):
    assert g.parse_pytest_summary(f"collected 45 items / 2 deselected\n....s.F\n{line}\n") == want


def test_pytest_summary_parser_without_a_summary_line():
    assert g.parse_pytest_summary("....\ngpu_check: TIMEOUT after 110 s\n") == {}


KERNEL_LOG = """\
........s..........s.
SKIPPED [1] kernels/tests_ctmoa/test_ctmoa.py:362: a GPU is present: the kernel tests compile and run them for real
SKIPPED [1] kernels/tests_ctmoa/test_benchmark_ctmoa.py:40: a GPU is present: the CLI would run the full benchmark
19 passed, 2 skipped in 88.12s (0:01:28)
"""


def test_kernel_tests_judge_lists_skips_and_counts():
    res = g.judge_kernel_tests(0, KERNEL_LOG, None, g.Command(["pytest", "kernels"]))
    assert res.status == "pass" and res.numbers["tests"] == "19 passed, 2 skipped"
    assert "1 x kernels/tests_ctmoa/test_ctmoa.py:362: a GPU is present" in res.tables[0]


def test_kernel_tests_fail_when_half_precision_skipped_on_the_gpu_machine():
    log = ("SKIPPED [6] kernels/tests_ctmoa/test_ctmoa.py:238: fp16/bf16 kernels are checked on a GPU only\n"
           "13 passed, 6 skipped in 9.00s\n")
    res = g.judge_kernel_tests(0, log, None, g.Command(["pytest", "kernels"]))
    assert res.status == "fail" and "half-precision cases skipped" in res.reason


def test_a_cuda_test_that_skips_for_want_of_a_gpu_fails_the_step():
    log = "SKIPPED [1] tests/test_stream.py:68: needs a CUDA device (pinned staging)\n5 passed, 1 skipped in 2.00s\n"
    res = g.judge_cuda_tests(0, log, None, g.Command(["pytest", "tests", "-m", "cuda"]))
    assert res.status == "fail" and "skipped on the GPU machine: 1 x tests/test_stream.py:68" in res.reason
    fair = "SKIPPED [1] tests/test_x.py:9: needs 2 GPUs\n5 passed, 1 skipped in 2.00s\n"
    res = g.judge_cuda_tests(0, fair, None, g.Command(["pytest", "tests", "-m", "cuda"]))
    assert res.status == "pass" and "1 kind(s) of skip" in res.notes[0]


def test_pytest_judge_failures_and_empty_selection():
    res = g.judge_cuda_tests(1, "1 failed, 1 passed in 3.00s\n", None, g.Command(["pytest", "tests", "-m", "cuda"]))
    assert (res.status, res.reason) == ("fail", "pytest exit 1: 1 passed, 1 failed")
    res = g.judge_cuda_tests(5, "no tests ran in 1.00s\n", None, g.Command(["pytest", "tests", "-k", "cuda"]))
    assert res.status == "fail" and "no test passed" in res.reason
    assert any("@pytest.mark.cuda" in n for n in res.notes)  # selected by name: said so


FED_LOG = """\
22:09:39 [pilot_hpc] 4 clients on 4 rank(s) (1 rank(s) per client), strategy pilot, engine torch, device cuda:0, output x
22:09:41 [pilot_hpc] round 0/2 stage 0 | 0.2 s (elapsed 0.2 s) | vqa 0.0  grounding 0.0
22:09:42 [pilot_hpc] round 1/2 stage 1 | 0.9 s (elapsed 1.1 s)  loss ce 2.2533 diff 0.0005 | vqa 0.0  grounding 0.0
22:09:42 [pilot_hpc] CT-MoA implementation: triton (impl='triton')
22:09:43 [pilot_hpc] round 2/2 stage 2 | 0.9 s (elapsed 2.0 s)  loss ce 2.2096 balance 0.1010 z 0.0034 | vqa 0.0

| client | task | metric | round 0 | round 2 | change |
|---|---|---|---|---|---|
| 0 | vqa | VQA acc | 0.0 | 0.0 | +0.0 |
| **mean** | all | | 0.0 | 0.0 | +0.0 |

22:09:44 [pilot_hpc] wrote metrics.json
"""


def test_federation_judge_needs_the_triton_path_and_says_caption_was_left_out():
    cmd = g.Command(["mpiexec", "-n", "4"])
    res = g.judge_federation(0, FED_LOG, None, cmd)
    assert res.status == "pass", res.reason
    assert res.numbers["CT-MoA path"] == "triton"
    assert res.numbers["rounds"].startswith("round 0/2 stage 0: 0.2 s; round 1/2 stage 1: 0.9 s")
    assert res.tables[0].startswith("| client | task |") and g.CAPTION_NOTE in res.notes
    res = g.judge_federation(0, FED_LOG.replace("implementation: triton", "implementation: reference"), None, cmd)
    assert res.status == "fail" and "not only the Triton kernels" in res.reason
    assert g.judge_federation(1, FED_LOG, None, cmd).reason == "mpiexec exit 1"


def test_kernel_bench_judge_reads_table_and_verdicts(tmp_path):
    out = tmp_path / "bench_ctmoa.md"
    out.write_text("# CT-MoA kernel benchmarks\n\nMeasured 2026-12-01 on FAKE DEVICE; torch x.\n\n"
                   "| implementation | fwd ms |\n|---|---:|\n| fused (Triton) | 1.000 |\n\n"
                   "- fwd+bwd speed-up over eager: 1.50x (target >= 1.3x): met\n"
                   "- fused forward / two plain stacked GEMMs: 1.20x (target <= 1.15x): NOT met\n")
    res = g.judge_kernel_bench(0, "", None, g.Command(["bench"], outputs=[out]))
    assert res.status == "pass" and res.numbers["targets"] == "1 met, 1 NOT met (of 2)"
    assert res.tables[0].startswith("| implementation |")
    missing = g.judge_kernel_bench(0, "", None, g.Command(["bench"], outputs=[tmp_path / "absent.md"]))
    assert missing.status == "fail" and "was not written" in missing.reason


def test_realscale_judge_copies_its_json_and_reads_the_numbers(tmp_path):
    folder = tmp_path / "rs"
    folder.mkdir()
    (folder / "round.json").write_text('{"tokens_per_s": 1234.5, "peak_memory_gib": 60.1, '
                                       '"planner_estimate_gib": 58.0}')
    ctx = ctx_for(tmp_path)
    ctx.out.mkdir()
    res = g.judge_realscale(0, "", ctx, g.Command(["rs"], outputs=[folder]))
    assert res.status == "pass"
    assert res.numbers == {"tokens_per_s": "1234.5", "peak_memory_gib": "60.1", "planner_estimate_gib": "58.0"}
    assert (ctx.out / "realscale" / "round.json").is_file()


def test_a_timed_out_step_is_ended_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f" open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    timeout = 2 + 2 * g.KILL_GRACE_S  # 2 s of running, then the kill
    rc, wall = g.run_command(g.Command([sys.executable, "-c", code]), dict(os.environ), tmp_path, timeout,
                             tmp_path / "log")
    assert rc == -9 and wall < timeout + 1 and time.monotonic() - t0 < 20
    assert "TIMEOUT after 2 s" in (tmp_path / "log").read_text()
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.1)  # the grandchild is gone once its parent's group was killed (zombies reaped by init)
    assert not os.path.exists(f"/proc/{child}") or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


# ----------------------------------------------------------------------- the summary


def test_summary_lists_each_step_with_result_numbers_and_loud_skips(tmp_path):
    results = [
        g.StepResult("kernel_tests", "pass", wall_s=80.4, budget_s=110, command="python3 -m pytest kernels",
                     numbers={"tests": "19 passed, 2 skipped"}, tables=["| a | b |\n|---|---|\n| 1 | 2 |"]),
        g.StepResult("federation", "fail", reason="mpiexec exit 1", wall_s=12.0, budget_s=70,
                     notes=[g.CAPTION_NOTE], log_tail="Traceback: boom"),
        g.StepResult("realscale", "skipped", reason="real-scale training is not in this checkout", budget_s=30),
    ]
    facts = {"device": "FAKE GPU", "device memory GiB": "1.0", "compute capability": "9.0", "driver": "1.2",
             "commit": "abc123", "torch": "2.11.0", "triton": "3.6.0", "datasets": "5.2.0"}
    text = g.write_summary(tmp_path / "gpu_check.md", results, facts, [], "2026-12-01 22:00 UTC", 93.2, "cmd")
    assert (tmp_path / "gpu_check.md").read_text() == text
    assert "Result: **1 passed, 1 FAILED, 1 SKIPPED**." in text
    assert "on **FAKE GPU** (1.0 GiB, compute capability 9.0, driver 1.2); commit abc123." in text
    assert "torch 2.11.0, triton 3.6.0" in text and "datasets 5.2.0" in text
    assert "| kernel_tests | pass | 80.4 | 110 | tests: 19 passed, 2 skipped |" in text
    assert "| federation | fail: mpiexec exit 1 | 12.0 | 70 |  |" in text
    assert "| realscale | skipped: real-scale training is not in this checkout | 0.0 | 30 |  |" in text
    assert "- **realscale: SKIPPED**: real-scale training is not in this checkout" in text
    assert f"- **federation**: {g.CAPTION_NOTE}" in text
    assert "| 1 | 2 |" in text and "Traceback: boom" in text
    assert "INCOMPLETE" not in text


def test_summary_of_a_run_still_going_says_incomplete(tmp_path):
    pending = [s for s in g.STEPS if s.name in ("federation", "realscale")]
    text = g.write_summary(tmp_path / "s.md", [g.StepResult("setup", "pass", wall_s=2, budget_s=30)], {}, pending,
                           "now", 2.0, "cmd")
    assert "**INCOMPLETE: 2 step(s) not run yet (federation, realscale)" in text
    assert "| federation | not run | | 70 | |" in text
    assert "unknown device" in text  # nothing claims a device it did not see


def test_output_folder_limits_are_checked(tmp_path):
    assert g.returned_files_problem(tmp_path) is None
    for i in range(9):
        (tmp_path / f"f{i}.md").write_text("x")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "x.json").write_text("{}")
    problem = g.returned_files_problem(tmp_path)
    assert "10 files" in problem and "1 file(s) more than 2 folders deep" in problem


# ----------------------------------------------------------------------- the exchange benchmark's driver


def _fake_bench(monkeypatch, tmp_path, **parts):
    """A stand-in pilot_hpc.bench in a stand-in tree: the driver's wiring without MPI."""
    import types

    (tmp_path / "src" / "pilot_hpc").mkdir(parents=True)
    (tmp_path / "src" / "pilot_hpc" / "bench.py").write_text("")
    mod = types.ModuleType("pilot_hpc.bench")
    mod.__file__ = str(tmp_path / "src" / "pilot_hpc" / "bench.py")
    for name, value in parts.items():
        setattr(mod, name, value)
    monkeypatch.setattr(g, "REPO", tmp_path)
    monkeypatch.setitem(sys.modules, "pilot_hpc.bench", mod)
    return mod


def test_exchange_driver_runs_full_size_without_the_smoke_rounds(monkeypatch, tmp_path, capsys):
    calls = {}

    def exchange(ranks, visual, text, chunk_mb, repeat):
        calls["exchange"] = (ranks, visual, text, chunk_mb, repeat)
        return {"chunk_bytes": 4096}

    def aggregation(k, visual, text, chunk_mb, device, repeat):
        calls["aggregation"] = device.type
        return {}

    def report(ex, ping, agg, rounds, command):
        calls["rounds"] = rounds
        return "| measure |\n|---|\n"

    _fake_bench(monkeypatch, tmp_path, P_VISUAL_7B=200, P_TEXT_7B=1000, exchange=exchange,
                pingpong=lambda size: (size, 1e9), aggregation=aggregation, report=report)
    out = tmp_path / "bench_exchange.md"
    assert g.exchange_bench_main(str(out), ranks=9, repeat=2, device="cpu") == 0
    assert calls == {"exchange": (9, 200, 1000, 64.0, 2), "aggregation": "cpu", "rounds": None}
    assert out.read_text() == "| measure |\n|---|\n"
    assert "QUICK FALLBACK" not in capsys.readouterr().out


def test_exchange_driver_falls_back_to_quick_when_the_benchmark_changed(monkeypatch, tmp_path, capsys):
    got = {}

    def main(argv):
        got["argv"] = argv
        return 0

    # No exchange/pingpong/aggregation/report: the refactor renamed them, say.
    _fake_bench(monkeypatch, tmp_path, P_VISUAL_7B=200, P_TEXT_7B=1000, main=main)
    assert g.exchange_bench_main(str(tmp_path / "x.md"), ranks=9, device="cpu") == 0
    assert got["argv"][:3] == ["--quick", "--device", "cpu"]
    assert "QUICK FALLBACK" in capsys.readouterr().out


def test_families_step_runs_only_on_request():
    """The per-family real-width rounds do not fit the 8-minute check: a step of their own,
    selected by --steps families (after setup), listed as on request."""
    assert "families" not in [s.name for s in g.STEPS]
    assert [s.name for s in g.select_steps("families")] == ["setup", "families"]
    assert "(on request: --steps families)" in g.list_steps()
    ctx = g.Context(repo=g.REPO, out=g.REPO, work=g.REPO / "w", wheel_dir=g.REPO, env={})
    argv = g.cmd_families(ctx).argv
    assert argv[-4:] == ["--family", "all", "--steps", "6"] and g.REALSCALE_MODULE in argv


def test_the_aggregation_benchmarks_are_a_step_on_request_judged_by_their_tables():
    step = next(s for s in g.EXTRA_STEPS if s.name == "aggregation_bench")
    assert [s.name for s in g.select_steps("aggregation_bench")] == ["setup", "aggregation_bench"]
    cmd = step.command(type("Ctx", (), {"python": "python"})())  # it needs only the interpreter
    assert "bench_codecs.main(['--device', 'cuda'])" in cmd.argv[-1] and "bench_product.main" in cmd.argv[-1]
    table = "| measure | product | flat (today) | ratio | target |\n|---|---|---|---|---|\n| pass | 1 s | 1 s | 1.00 | <= 1.5 |\n"
    assert step.judge(0, table, None, cmd).status != "fail"
    assert step.judge(0, "no table", None, cmd).reason == "exit 0 but no table printed"
    assert step.judge(1, table, None, cmd).reason == "exit 1"
