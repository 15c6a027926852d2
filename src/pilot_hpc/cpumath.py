"""The CPU math libraries' code paths, pinned so that a CPU run gives the same numbers
on any x86-64 CPU with AVX2.

PyTorch picks its vectorised kernels (softmax, norms, reductions, element-wise maths)
by the CPU's widest instruction set, and MKL and oneDNN pick their GEMM kernels the same
way; AVX-512 and AVX2 kernels sum in different orders, so one commit gave 68.3 / 589.4 /
29.4 on this project's AVX-512 machine and 67.2 / 562.3 / 30.0 on an AMD EPYC (AVX2) for
the smoke world's round 0. Each library reads its switch once, when it loads, so the
switches are set here, when `pilot_hpc` is imported (before any torch import of ours),
and passed on to every rank mpiexec or Slurm starts:

  ATEN_CPU_CAPABILITY=avx2    PyTorch's own kernels: the AVX2 builds
  MKL_CBWR=COMPATIBLE         MKL's conditional numerical reproducibility (PyTorch's BLAS is
                              MKL): its SSE2 branch, the one branch besides AUTO that Intel
                              documents for non-Intel CPUs (oneMKL developer guide, "Getting
                              Started with Conditional Numerical Reproducibility"; AVX2 would
                              hold on Intel CPUs only). Its cost is measured in BENCHMARKS.md
  ONEDNN_MAX_CPU_ISA=AVX2     oneDNN (PyTorch's mkldnn kernels) no wider than AVX2
  NPY_DISABLE_CPU_FEATURES    NumPy's dispatched kernels no wider than AVX2 (x86-64-v3);
   =X86_V4 AVX512_ICL         the names of NumPy >= 2.4
    AVX512_SPR

A value the user already set wins. PILOT_HPC_CPU_MATH=native leaves all three alone (the
libraries' fastest path on this CPU; numbers tied to the CPU model). Threads matter too:
every rank runs one thread (run.threads_per_rank), so no reduction is split by core count.
"""

from __future__ import annotations

import os
import sys

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2",
        "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
SWITCH = "PILOT_HPC_CPU_MATH"
MODES = ("avx2", "native")


def apply(environ=os.environ) -> bool:
    """Sets the pins (unless PILOT_HPC_CPU_MATH=native) where the user set nothing; True
    when they were applied before torch loaded in this process (so they hold here too,
    not only in the processes it starts)."""
    mode = environ.get(SWITCH, "avx2")
    if mode not in MODES:
        raise SystemExit(f"{SWITCH}={mode!r}: use one of {', '.join(MODES)} (avx2: numbers that reproduce on any "
                         "x86-64 CPU with AVX2; native: the fastest path of this CPU)")
    if mode == "native":
        return False
    for key, value in PINS.items():
        environ.setdefault(key, value)
    return "torch" not in sys.modules


def describe() -> dict[str, str]:
    """What this process runs with (for the log and metrics.json): PyTorch's active kernel
    capability and the libraries' switches as set."""
    import torch

    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{key: os.environ.get(key, "") for key in PINS}, SWITCH: os.environ.get(SWITCH, "avx2")}
