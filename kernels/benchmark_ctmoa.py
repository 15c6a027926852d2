"""Microbenchmarks of CT-MoA: fused Triton vs the eager reference vs torch.compile of it.

One command on a GPU node writes kernels/BENCHMARKS.md (LLaVA-7B sizes, bf16):

    python -m pilot_hpc_kernels.benchmark_ctmoa --out kernels/BENCHMARKS.md

Measured per implementation: forward, backward (autograd.grad of out and the two aux
statistics, graph retained) and forward+backward; the memory the forward graph keeps
alive (allocated after the forward minus before, minus the returned tensors) and the
peak of a forward+backward (torch.cuda.max_memory_allocated). The roofline reference is
the plain GEMMs on the stacked weights (torch.matmul): forward H W1s^T and S W2cat^T;
backward the four the fused backward cannot avoid (recompute of H W1s^T, G W2cat, and
the weight gradients of the trainable MLPs).

pytest collects the test_* functions below (kernels/conftest.py): on a CPU they run at
tiny sizes in Triton's interpreter, torch.compile with the "aot_eager" backend (no C++
toolchain, seconds instead of a minute), and only check that every variant runs. No
test ever asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from pilot_hpc_kernels.ctmoa_reference import AdapterWeights, ctmoa_reference, mlp_expert_index

TARGETS = ("fwd+bwd >= 1.3x faster than the eager reference; fused forward <= 1.15x the time of the two plain "
           "stacked GEMMs; saved activation memory <= 0.5x eager")


@dataclass
class Shape:
    batch: int = 16
    tokens: int = 576
    cv: int = 1024
    c: int = 4096
    t: int = 3
    dtype: torch.dtype = torch.bfloat16

    @property
    def m(self) -> int:
        return self.batch * self.tokens


LLAVA_7B = Shape()
TINY = Shape(batch=1, tokens=20, cv=24, c=20, t=3, dtype=torch.float32)


@dataclass
class Result:
    name: str
    fwd_ms: float
    bwd_ms: float
    both_ms: float
    saved_mib: float | None = None
    peak_mib: float | None = None
    extra: dict = field(default_factory=dict)


def build(shape: Shape, device: str, seed: int = 0):
    """Stage-2 problem: router, own (0) and cross (2, 4, ..) adapters train; foreign
    adapters (1, 3, ..) and H (frozen vision tower) do not."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*s, scale=1.0, grad=False):
        x = (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=shape.dtype)
        return x.requires_grad_(grad)

    h = rand(shape.batch, shape.tokens, shape.cv)
    wr = rand(shape.t, shape.cv, scale=1 / math.sqrt(shape.cv), grad=True)
    adapters = []
    for i in range(2 * shape.t - 1):
        train = i % 2 == 0
        adapters.append(AdapterWeights(rand(shape.c, shape.cv, scale=1 / math.sqrt(shape.cv), grad=train),
                                       rand(shape.c, scale=0.02, grad=train),
                                       rand(shape.c, shape.c, scale=1 / math.sqrt(shape.c), grad=train),
                                       rand(shape.c, scale=0.02, grad=train)))
    return h, wr, adapters, mlp_expert_index(shape.t)


def _ref_tuple(h, wr, adapters, expert_of):
    # torch.compile gets plain tensors back (the reference returns dataclasses).
    r = ctmoa_reference(h, wr, adapters, expert_of)
    return r.out, r.probs, r.stats.prob_sum, r.stats.lse_sq_sum


def implementations(device: str, with_compile: bool = True) -> dict:
    from pilot_hpc_kernels.ctmoa import ctmoa_triton

    def fused(h, wr, adapters, expert_of):
        r = ctmoa_triton(h, wr, adapters, expert_of)
        return r.out, r.probs, r.stats.prob_sum, r.stats.lse_sq_sum

    impls = {"fused (Triton)": fused, "eager reference": _ref_tuple}
    if with_compile:
        backend = "inductor" if device == "cuda" else "aot_eager"
        impls[f"torch.compile reference ({backend})"] = torch.compile(_ref_tuple, backend=backend)
    return impls


def _timer(fn, device: str, reps: int) -> float:
    """Milliseconds per call: triton's do_bench (CUDA events, median) on a GPU; one
    wall-clock call on a CPU, where the number only proves the variant runs."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=max(1, reps // 4), rep=reps, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _mib(nbytes: int) -> float:
    return nbytes / 2**20


def measure(impl, problem, device: str, reps: int, name: str) -> Result:
    h, wr, adapters, eo = problem
    params = [x for x in [h, wr] + [x for a in adapters for x in a] if x.requires_grad]
    first = impl(h, wr, adapters, eo)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(first[0].shape, generator=gen).to(device=device, dtype=first[0].dtype),
             torch.ones_like(first[2]), torch.ones((), device=device)]  # out, prob_sum, lse_sq_sum

    def backward(outs):
        torch.autograd.grad([outs[0], outs[2], outs[3]], params, grads, retain_graph=True)

    fwd = _timer(lambda: impl(h, wr, adapters, eo), device, reps)
    bwd = _timer(lambda: backward(first), device, reps)
    both = _timer(lambda: backward(impl(h, wr, adapters, eo)), device, reps)
    saved = peak = None
    if device == "cuda":
        del first
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        outs = impl(h, wr, adapters, eo)
        torch.cuda.synchronize()
        returned = sum(o.numel() * o.element_size() for o in outs)
        saved = _mib(torch.cuda.memory_allocated() - before - returned)
        del outs
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        backward(impl(h, wr, adapters, eo))
        torch.cuda.synchronize()
        peak = _mib(torch.cuda.max_memory_allocated() - before)
    return Result(name, fwd, bwd, both, saved, peak)


def plain_gemms(problem, device: str, reps: int) -> Result:
    """Roofline: the same GEMMs as plain torch.matmul on pre-stacked weights."""
    h, wr, adapters, eo = problem
    h2 = h.reshape(-1, h.shape[-1])  # [M, Cv]
    w1s = torch.cat([a.w1.detach() for a in adapters])  # [E*C, Cv]
    w2cat = torch.cat([a.w2.detach() for a in adapters], dim=1)  # [C, E*C]
    c = w2cat.shape[0]
    n_tr = sum(a.w1.requires_grad for a in adapters)
    s = torch.randn(h2.shape[0], w1s.shape[0], device=device).to(h.dtype)  # [M, E*C]
    g = torch.randn(h2.shape[0], c, device=device).to(h.dtype)  # [M, C]

    def fwd():
        torch.matmul(h2, w1s.t())
        torch.matmul(s, w2cat.t())

    def bwd():
        torch.matmul(h2, w1s.t())  # recompute of the first GEMM
        torch.matmul(g, w2cat)  # D = G W2cat
        torch.matmul(g.t(), s[:, :n_tr * c])  # dW2 of the trainable MLPs
        torch.matmul(s[:, :n_tr * c].t(), h2)  # dW1 of the trainable MLPs

    f, b = _timer(fwd, device, reps), _timer(bwd, device, reps)
    return Result("plain stacked GEMMs (torch.matmul)", f, b, f + b)


def run(shape: Shape, device: str, reps: int = 100, with_compile: bool = True) -> list[Result]:
    problem = build(shape, device)
    results = [measure(fn, problem, device, reps, name) for name, fn in implementations(device, with_compile).items()]
    results.append(plain_gemms(problem, device, reps))
    return results


def render_markdown(results: list[Result], shape: Shape, device_name: str, command: str, judge: bool = True) -> str:
    fused, eager, plain = results[0], results[1], results[-1]

    def num(x, fmt="{:.3f}"):
        return "n/a" if x is None else fmt.format(x)

    rows = ["| implementation | fwd ms | bwd ms | fwd+bwd ms | saved by fwd graph MiB | peak fwd+bwd MiB |",
            "|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {r.name} | {num(r.fwd_ms)} | {num(r.bwd_ms)} | {num(r.both_ms)} | {num(r.saved_mib, '{:.1f}')} | "
             f"{num(r.peak_mib, '{:.1f}')} |" for r in results]
    speedup = eager.both_ms / fused.both_ms
    roof = fused.fwd_ms / plain.fwd_ms
    mem = None if fused.saved_mib is None or not eager.saved_mib else fused.saved_mib / eager.saved_mib

    def judged(ok: bool | None) -> str:
        if not judge:
            return "not judged (not a GPU run)"
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    verdict = [f"- fwd+bwd speed-up over eager: {speedup:.2f}x (target >= 1.3x): {judged(speedup >= 1.3)}",
               f"- fused forward / two plain stacked GEMMs: {roof:.2f}x (target <= 1.15x): {judged(roof <= 1.15)}",
               f"- fused fwd+bwd / plain GEMMs fwd+bwd: {fused.both_ms / plain.both_ms:.2f}x (information)",
               f"- saved activation memory fused / eager: {num(mem, '{:.2f}x')} (target <= 0.5x): "
               f"{judged(None if mem is None else mem <= 0.5)}"]
    return "\n".join([
        "# CT-MoA kernel benchmarks", "",
        f"Measured {datetime.date.today().isoformat()} on {device_name}; torch {torch.__version__}.",
        f"Shape: {shape.batch} x {shape.tokens} tokens, Cv={shape.cv}, C={shape.c}, T={shape.t} "
        f"({2 * shape.t - 1} MLPs), {str(shape.dtype).replace('torch.', '')}; stage-2 trainable set (router, own and "
        "cross adapters; foreign adapters and H frozen). Backward = autograd.grad of out, prob_sum and lse_sq_sum.",
        "", "Reproduce:", "", "```", command, "```", "", f"Targets: {TARGETS}.", "", *rows, "", *verdict, ""])


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the markdown table here (default: stdout)")
    p.add_argument("--batch", type=int, default=LLAVA_7B.batch)
    p.add_argument("--tokens", type=int, default=LLAVA_7B.tokens)
    p.add_argument("--cv", type=int, default=LLAVA_7B.cv)
    p.add_argument("--c", type=int, default=LLAVA_7B.c)
    p.add_argument("--t", type=int, default=LLAVA_7B.t)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=100, help="do_bench time budget per measurement, ms")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes (needs TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if args.tiny:
        shape, device = TINY, "cpu"
    else:
        if not torch.cuda.is_available():
            print("benchmark_ctmoa: no CUDA GPU visible; the numbers need one (use --tiny for a CPU smoke run)",
                  file=sys.stderr)
            return 2
        shape = Shape(args.batch, args.tokens, args.cv, args.c, args.t, _dtype(args.dtype))
        device = "cuda"
    results = run(shape, device, args.reps, with_compile=not args.no_compile)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter; timings meaningless)"
    text = render_markdown(results, shape, name, "python -m pilot_hpc_kernels.benchmark_ctmoa " + " ".join(
        sys.argv[1:] if argv is None else argv), judge=device == "cuda")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


# ----------------------------------------------------------------------------- pytest
def _skip_reason() -> str | None:
    try:
        from pilot_hpc_kernels import ctmoa
    except ImportError as exc:
        return f"triton unavailable: {exc}"
    if not torch.cuda.is_available() and not ctmoa.INTERPRETED:
        return "no GPU, and the kernels were imported without TRITON_INTERPRET=1"
    return None


def _pytest_shape_device() -> tuple[Shape, str]:
    # Small on a GPU too: the suite checks that the benchmark runs, the CLI measures.
    if torch.cuda.is_available():
        return Shape(batch=2, tokens=64, cv=128, c=192, t=3, dtype=torch.bfloat16), "cuda"
    return TINY, "cpu"


def test_benchmark_all_variants_run():
    import pytest
    if (reason := _skip_reason()) is not None:
        pytest.skip(reason)
    shape, device = _pytest_shape_device()
    results = run(shape, device, reps=5)
    assert [r.name for r in results][:2] == ["fused (Triton)", "eager reference"] and len(results) == 4
    for r in results:
        assert all(math.isfinite(x) and x > 0 for x in (r.fwd_ms, r.bwd_ms, r.both_ms)), r
    text = render_markdown(results, shape, device, "pytest", judge=False)
    assert "| fused (Triton) |" in text and "Targets:" in text


def test_benchmark_cli_refuses_without_gpu(capsys):
    if torch.cuda.is_available():
        import pytest
        pytest.skip("a GPU is present: the CLI would run the full benchmark")
    assert main(["--no-compile"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(main())
