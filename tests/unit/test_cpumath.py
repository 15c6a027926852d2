"""The CPU math libraries' code paths are pinned when pilot_hpc is imported (cpumath.py),
so every rank mpiexec or Slurm starts inherits them; a user's value wins; 'native' opts out."""

import json
import os
import subprocess
import sys

import pytest

from pilot_hpc import cpumath

EXPECTED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
PROBE = ("import json, os, pilot_hpc, torch; print(json.dumps({'env': {k: os.environ.get(k) for k in %r}, "
         "'cap': torch.backends.cpu.get_cpu_capability()}))" % sorted(EXPECTED))


def _fresh(**env):
    base = {k: v for k, v in os.environ.items() if k not in EXPECTED and k != cpumath.SWITCH}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.unit


def test_the_pins_are_the_documented_ones():
    assert cpumath.PINS == EXPECTED


def test_importing_pilot_hpc_pins_the_libraries_before_torch_loads():
    got = _fresh()
    assert got["env"] == EXPECTED
    assert got["cap"] == "AVX2"  # PyTorch's own kernels run their AVX2 builds


def test_a_value_the_user_set_wins_and_native_sets_nothing():
    assert _fresh(MKL_CBWR="AUTO")["env"]["MKL_CBWR"] == "AUTO"
    native = _fresh(**{cpumath.SWITCH: "native"})
    assert native["env"] == {k: None for k in EXPECTED}


def test_an_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(SystemExit, match="avx2, native"):
        cpumath.apply({cpumath.SWITCH: "avx512"})
