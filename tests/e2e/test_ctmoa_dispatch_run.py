"""The CT-MoA dispatch (pilot_hpc.model.ctmoa_dispatch): which path a call takes, the
up-front fallbacks of `auto`, the log line; and a federation through the fused Triton
CT-MoA (forced, in Triton's interpreter on CPU) gives the reference run's results, so
the model really goes through the dispatch.

The kernels themselves are tested in kernels/tests_ctmoa/test_ctmoa.py. Here the Triton path runs
only in subprocesses: TRITON_INTERPRET must be set before triton is first imported,
which this test process does not control.
"""

import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import SMOKE, load_metrics, run_main, small_overrides
from pilot_hpc.config import ConfigError
from pilot_hpc.model import ctmoa_dispatch
from pilot_hpc.model.ctmoa import AdapterWeights, ctmoa_reference, mlp_expert_index


def make_problem(m=3, cv=8, c=8, t=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, m, cv, generator=gen).to(dtype)
    wr = torch.randn(t, cv, generator=gen).to(dtype)
    adapters = [AdapterWeights(*(torch.randn(*s, generator=gen).to(dtype) for s in ((c, cv), (c,), (c, c), (c,))))
                for _ in range(2 * t - 1)]
    return h, wr, adapters, mlp_expert_index(t)


@pytest.fixture
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv(ctmoa_dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(ctmoa_dispatch, "_logged_paths", set())
    return ctmoa_dispatch


def test_dispatch_auto_on_cpu_and_forced_reference(fresh_dispatch):
    h = torch.zeros(2, 4)
    path, reason = fresh_dispatch.resolve_impl(h, "auto")
    assert path == "reference" and "h on cpu" in reason
    assert fresh_dispatch.resolve_impl(h, "reference")[0] == "reference"
    with pytest.raises(ConfigError, match="must be one of"):
        fresh_dispatch.resolve_impl(h, "cuda")


def test_auto_falls_back_on_dtypes_before_any_launch(fresh_dispatch):
    h, wr, adapters, eo = make_problem()
    assert fresh_dispatch.fallback_reason(h.double(), wr.double(), [a._replace(**{k: v.double() for k, v in
                                          a._asdict().items()}) for a in adapters]) == \
        "dtype float64 (the kernels take float32, float16, bfloat16)"
    mixed = list(adapters)
    mixed[1] = mixed[1]._replace(w2=mixed[1].w2.half())
    reason = fresh_dispatch.fallback_reason(h, wr, mixed)
    assert reason.startswith("mixed dtypes ['float16', 'float32']"), reason
    assert "mixed dtypes" in fresh_dispatch.fallback_reason(h, wr.double(), adapters)
    path, reason = fresh_dispatch.resolve_impl(h, "auto", wr, mixed)
    assert path == "reference" and "mixed dtypes" in reason


def test_capability_rule():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert "8.0+" in ctmoa_dispatch.capability_reason(bf16, (7, 5))  # T4: no bf16 MMA
    assert ctmoa_dispatch.capability_reason(bf16, (8, 0)) is None
    assert ctmoa_dispatch.capability_reason(bf16, (9, 0)) is None
    assert ctmoa_dispatch.capability_reason(fp16, (7, 5)) is None
    assert "7.5+" in ctmoa_dispatch.capability_reason(fp32, (7, 0))  # V100: below Triton's floor


def test_dispatch_env_overrides_argument(fresh_dispatch, monkeypatch):
    h = torch.zeros(2, 4)
    monkeypatch.setenv(fresh_dispatch.ENV_VAR, "reference")
    path, reason = fresh_dispatch.resolve_impl(h, "triton")
    assert path == "reference" and fresh_dispatch.ENV_VAR in reason
    monkeypatch.setenv(fresh_dispatch.ENV_VAR, "bogus")
    with pytest.raises(ConfigError, match="bogus"):
        fresh_dispatch.resolve_impl(h, "auto")


def test_dispatch_forced_triton_on_cpu_needs_the_interpreter(fresh_dispatch, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fresh_dispatch.resolve_impl(torch.zeros(2, 4), "triton")
    monkeypatch.setenv(fresh_dispatch.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fresh_dispatch.resolve_impl(torch.zeros(2, 4), "reference")


def test_dispatch_logs_the_path_once(fresh_dispatch, caplog):
    h, wr, adapters, eo = make_problem()
    with caplog.at_level(logging.INFO, logger="pilot_hpc.ctmoa"):
        for _ in range(3):
            res = fresh_dispatch.ctmoa(h, wr, adapters, eo)  # auto on a CPU: the reference
    records = [r for r in caplog.records if r.name == "pilot_hpc.ctmoa"]
    assert len(records) == 1 and "reference" in records[0].getMessage() and "h on cpu" in records[0].getMessage()
    assert torch.equal(res.out, ctmoa_reference(h, wr, adapters, eo).out)


_FORCED_SCRIPT = r'''
import logging, os, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]  # this test's folder, and tests/ (helpers)
from test_ctmoa_dispatch_run import make_problem
from pilot_hpc.model import ctmoa_dispatch
from pilot_hpc.model.ctmoa import ctmoa_reference
h, wr, adapters, eo = make_problem(m=5, cv=16, c=16, t=3)
wr.requires_grad_(True)
got, want = ctmoa_dispatch.ctmoa(h, wr, adapters, eo), ctmoa_reference(h, wr, adapters, eo)
err = ((got.out - want.out).abs().max() / want.out.abs().max()).item()
g1, = torch.autograd.grad(got.out.sum() + got.stats.lse_sq_sum, [wr])
g2, = torch.autograd.grad(want.out.sum() + want.stats.lse_sq_sum, [wr])
gerr = ((g1 - g2).abs().max() / g2.abs().max()).item()
print(f"ERR {err:.3e} {gerr:.3e}")
'''


def test_dispatch_forced_triton_runs_the_kernels():
    """PILOT_HPC_CTMOA=triton really runs the kernels (in the interpreter) and logs it."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"triton unavailable: {exc}")
    env = dict(os.environ, PILOT_HPC_CTMOA="triton", TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _FORCED_SCRIPT, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CT-MoA implementation: triton" in run.stdout + run.stderr
    err, gerr = (float(x) for x in run.stdout.split("ERR ")[1].split())
    # fp32, reductions of <= 16 terms: summation order alone, far below 1e-5.
    assert err <= 1e-5 and gerr <= 1e-5, (err, gerr)


_COMPILE_SCRIPT = r'''
import torch, torch.nn as nn
from pilot_hpc.model.connector import PilotConnector

class Projector(nn.Module):  # the LLaVA projector's layout: linear_1, GELU, linear_2
    def __init__(self, cv, c):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(cv, c), nn.GELU(), nn.Linear(c, c)

    def forward(self, h):
        return self.linear_2(self.act(self.linear_1(h)))

torch.manual_seed(0)
h = torch.randn(2, 5, 16)
results = {}
for name, impl in (("compiled", "triton"), ("eager", "triton"), ("reference", "reference")):
    torch.manual_seed(1)
    conn = PilotConnector(Projector(16, 16), num_tasks=3, own_task=1, ctmoa_impl=impl)
    conn.init_cross_adapters()
    conn.set_stage(2)
    run = torch.compile(conn, backend="aot_eager", fullgraph=True) if name == "compiled" else conn
    out = run(h)
    loss = out.square().sum() + conn.aux["balance"] + conn.aux["z"]
    results[name] = [out] + list(torch.autograd.grad(loss, [p for p in conn.parameters() if p.requires_grad]))

def nerr(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

same = all(torch.equal(a, b) for a, b in zip(results["compiled"][:1], results["eager"][:1]))
print("RESULT", same, max(nerr(a, b) for a, b in zip(results["compiled"], results["eager"])),
      max(nerr(a, b) for a, b in zip(results["compiled"], results["reference"])))
'''


def test_connector_compiles_fullgraph_through_the_fused_op():
    """torch.compile(fullgraph=True) of the model's connector at stage 2 with the Triton
    path (interpreter, subprocess): no graph break (the kernels are custom ops with fake
    impls), the eager fused call's output bit for bit and its gradients, and the
    reference path's results within fp32 summation-order error."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"triton unavailable: {exc}")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(ctmoa_dispatch.ENV_VAR, None)
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    same, err_eager, err_ref = run.stdout.split("RESULT ")[1].split()
    assert same == "True"
    # the same ops in both; AOTAutograd may only sum incoming gradients in another order
    assert float(err_eager) <= 1e-6, err_eager
    assert float(err_ref) <= 1e-5, err_ref  # fp32, reductions of <= 48 terms


def test_forced_triton_path_reproduces_the_reference_run(small_world, cache_dir, tmp_path):
    # One training step per client and round: the interpreter runs every kernel program in
    # Python, so each stage-2 step costs seconds; the reference run takes the same config.
    short = ["train.max_steps=1"]
    ref_out, out = tmp_path / "reference", tmp_path / "triton"
    proc = run_main(["--config", SMOKE] + small_overrides(cache_dir, str(ref_out)) + short, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CT-MoA implementation: reference" in proc.stdout
    proc = run_main(["--config", SMOKE] + small_overrides(cache_dir, str(out)) + short, timeout=900,
                    env={"PILOT_HPC_CTMOA": "triton", "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CT-MoA implementation: triton" in proc.stdout
    ref, got = load_metrics(ref_out), load_metrics(out)
    assert len(got["final"]) == 3 and got["rounds"][-1]["round"] == 2
    for a, b in zip(ref["final"], got["final"]):
        # fp32 kernels differ from eager only in summation order (~1e-6 relative per op);
        # over an AdamW step the mean losses agree to 1e-4, and greedy generation on
        # the 6-sample eval splits gives the same answers.
        for key in ("ce", "balance", "z"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (a["client"], key, a[key], b[key])
        assert a["value"] == b["value"], (a["client"], a["value"], b["value"])
