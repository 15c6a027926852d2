"""Microbenchmarks and the analytic cost model of CT-MoA: fused Triton vs eager vs compile.

One command writes kernels/BENCHMARKS.md (LLaVA-7B sizes, bf16):

    python -m pilot_hpc_kernels.benchmark_ctmoa --out kernels/BENCHMARKS.md

Without CUDA it writes only the cost model (`cost_model`, `saved_bytes`): per launch of
the fused path its GEMM FLOPs and the bytes it must move at least, the fused and eager
forward + backward GEMM FLOPs side by side, and the memory each forward keeps for the
backward. The launch list is the launchers' own (`tests` check it against the launches
recorded in ctmoa_fwd.LAUNCHES). On a GPU it also times the variants below and prints
achieved TFLOP/s (cost-model FLOPs / measured time) and the fraction of the device's peak.

Measured per implementation: forward, backward (autograd.grad of out and the two aux
statistics, graph retained) and forward+backward; the memory the forward graph keeps
alive (allocated after the forward minus before, minus the returned tensors) and the
peak of a forward+backward (torch.cuda.max_memory_allocated). The roofline reference is
the plain GEMMs on the stacked weights (torch.matmul): forward H W1s^T and S W2cat^T;
backward the three GEMMs per trainable MLP (D = G W2, dW2, dW1).

`pytest kernels/` runs it at tiny sizes (kernels/tests_ctmoa/test_benchmark_ctmoa.py): on
a CPU in Triton's interpreter, torch.compile with the "aot_eager" backend (no C++
toolchain, seconds instead of a minute); those tests only check that every variant runs
and that the cost model counts the launches. No test ever asserts a speed.
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
    n_out: int = 0  # the MLPs' output width N; 0: N = C (LLaVA's projector)

    @property
    def m(self) -> int:
        return self.batch * self.tokens

    @property
    def n(self) -> int:
        return self.n_out or self.c


LLAVA_7B = Shape()
TINY = Shape(batch=1, tokens=20, cv=24, c=20, t=3, dtype=torch.float32)


# ----------------------------------------------------------------------------- cost model
@dataclass
class Cost:
    """One launch (or torch.matmul) of the fused path: GEMM m x n x k, count of them."""
    phase: str  # "fwd" or "bwd"
    name: str  # as recorded by the launchers (ctmoa_fwd.record)
    m: int
    n: int
    k: int
    count: int
    nbytes: int  # per launch: what it must read and write at least (operands once)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k * self.count


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _roles(shape: Shape):
    """(trainable MLPs, frozen MLPs) of stage 2: own (0) and cross (2, 4, ..) train."""
    e = 2 * shape.t - 1
    n_tr = len(range(0, e, 2))
    return n_tr, e - n_tr


def cost_model(shape: Shape, h_grad: bool = False, router_grad: bool = True) -> list[Cost]:
    """The fused path's GEMM launches at `shape` (stage-2 trainable set), in launch order.

    Mirrors ctmoa_fwd.mixture_forward / ctmoa_bwd.mixture_backward: the trainable MLPs
    go through the mixed down GEMM and keep Z; with the router trainable each frozen MLP
    gets its own Y = gelu(Z) W2^T + b2 (kept) and adds P Y in the mix's epilogue. The
    small kernels with a T-sized GEMM side (router, bias terms) count under "router"."""
    m, cv, c, n, t, el = shape.m, shape.cv, shape.c, shape.n, shape.t, _elt(shape.dtype)
    n_tr, n_fr = _roles(shape)
    n_visit = n_tr + n_fr if h_grad else n_tr  # H's gradient runs through every MLP
    need_dp = router_grad or h_grad
    n_y = n_fr if need_dp and not h_grad else 0  # frozen MLPs that keep Y instead of being visited
    n_mix = n_tr + n_fr - n_y
    out = [Cost("fwd", "router fwd", m, t, cv, 1, m * cv * el + t * cv * el + m * (t + 1) * 4)]
    # H, W1 -> S (and Z when the MLP trains)
    out.append(Cost("fwd", "up", m, c, cv, n_mix, m * cv * el + c * cv * el + m * c * el * (2 if n_tr else 1)))
    if n_y:  # H, W1 -> gelu(Z); then gelu(Z), W2 -> Y
        out.append(Cost("fwd", "up frozen", m, c, cv, n_y, m * cv * el + c * cv * el + m * c * el))
        out.append(Cost("fwd", "down frozen Y", m, n, c, n_y, m * c * el + n * c * el + m * n * el))
    out.append(Cost("fwd", "down mix", m, n, n_mix * c, 1,
                    m * n_mix * c * el + n_mix * n * c * el + n_y * m * n * el + m * t * 4 + m * n * el))
    # G, Z, W2 -> dZ, S
    out.append(Cost("bwd", "bwd D", m, c, n, n_visit, m * n * el + m * c * el + n * c * el + m * c * el * 2))
    if need_dp:
        out.append(Cost("bwd", "router bwd", t, cv, m, 1, m * cv * el + m * t * 8 + t * cv * 4))
    if h_grad:
        out.append(Cost("bwd", "torch dH", m, cv, c, n_visit, m * c * el + c * cv * el + m * cv * 4))
    out.append(Cost("bwd", "torch dW1", c, cv, m, n_tr, m * c * el + m * cv * el + c * cv * el))
    out.append(Cost("bwd", "torch dW2", n, c, m, n_tr, m * n * el + m * c * el + n * c * el))
    return out


def eager_flops(shape: Shape, h_grad: bool = False) -> dict[str, int]:
    """GEMM FLOPs of eager autograd on ctmoa_reference (stage 2, router trainable):
    forward all MLPs' two GEMMs and the router; backward per trainable MLP dA = G W2,
    dW2 and dW1 (and dH), the router's dW_r; a frozen MLP's dP term is its saved output
    times G, element-wise (no GEMM)."""
    m, cv, c, n, t = shape.m, shape.cv, shape.c, shape.n, shape.t
    n_tr, n_fr = _roles(shape)
    mlp = 2 * m * cv * c + 2 * m * c * n
    fwd = (n_tr + n_fr) * mlp + 2 * m * t * cv
    bwd = n_tr * (4 * m * c * n + 2 * m * cv * c) + 2 * m * t * cv
    if h_grad:  # dH through every MLP, and dA through the frozen ones too
        bwd += (n_tr + n_fr) * 2 * m * c * cv + n_fr * 2 * m * c * n
    return {"fwd": fwd, "bwd": bwd}


def saved_bytes(shape: Shape) -> dict[str, int]:
    """Memory the forward keeps for the backward (stage 2; H, router and weights are the
    caller's and not counted). Fused: Z of the trainable MLPs and Y of the frozen ones in
    the compute dtype, probs [M, T] and lse [M] in fp32. Eager (its autograd graph on
    ctmoa_reference): per trainable MLP Z and gelu(Z) in the compute dtype and its output
    in fp32 (the mixing product saves it for dP); per frozen MLP its fp32 output; probs."""
    m, c, n, t, el = shape.m, shape.c, shape.n, shape.t, _elt(shape.dtype)
    n_tr, n_fr = _roles(shape)
    fused = n_tr * m * c * el + n_fr * m * n * el + m * t * 4 + m * 4
    # in fp32, y.float() is y itself: the product saves the linear's own output, once
    eager = n_tr * (2 * m * c * el + m * n * 4) + n_fr * m * n * 4 + m * t * 4
    return {"fused": fused, "eager": eager}


def render_cost_model(shape: Shape) -> str:
    costs = cost_model(shape)
    fwd = sum(x.flops for x in costs if x.phase == "fwd")
    bwd = sum(x.flops for x in costs if x.phase == "bwd")
    eager = eager_flops(shape)
    mem = saved_bytes(shape)
    g, mb = 1e9, 1e6
    rows = ["| phase | launch | GEMM m x n x k | launches | GFLOP | min. MB moved per launch |",
            "|---|---|---|---:|---:|---:|"]
    rows += [f"| {x.phase} | {x.name} | {x.m} x {x.n} x {x.k} | {x.count} | {x.flops / g:,.1f} | "
             f"{x.nbytes / mb:,.1f} |" for x in costs]
    side = ["| GEMM GFLOP | fused | eager |", "|---|---:|---:|",
            f"| forward | {fwd / g:,.1f} | {eager['fwd'] / g:,.1f} |",
            f"| backward | {bwd / g:,.1f} | {eager['bwd'] / g:,.1f} |",
            f"| forward + backward | {(fwd + bwd) / g:,.1f} | {(eager['fwd'] + eager['bwd']) / g:,.1f} |",
            "", "| kept for the backward | fused | eager | fused / eager |", "|---|---:|---:|---:|",
            f"| MB | {mem['fused'] / mb:,.1f} | {mem['eager'] / mb:,.1f} | {mem['fused'] / mem['eager']:.2f}x |"]
    return "\n".join(side + ["", *rows])


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
                                       rand(shape.n, shape.c, scale=1 / math.sqrt(shape.c), grad=train),
                                       rand(shape.n, scale=0.02, grad=train)))
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
    # One call: measure() has already run each variant once (torch.compile's warm-up).
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
    w2cat = torch.cat([a.w2.detach() for a in adapters], dim=1)  # [N, E*C]
    n, c = w2cat.shape[0], adapters[0].w1.shape[0]
    n_tr = sum(a.w1.requires_grad for a in adapters)
    s = torch.randn(h2.shape[0], w1s.shape[0], device=device).to(h.dtype)  # [M, E*C]
    g = torch.randn(h2.shape[0], n, device=device).to(h.dtype)  # [M, N]

    def fwd():
        torch.matmul(h2, w1s.t())
        torch.matmul(s, w2cat.t())

    def bwd():
        torch.matmul(g, w2cat[:, :n_tr * c])  # D = G W2 of the trainable MLPs
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

    costs = cost_model(shape)
    flops_fused = sum(x.flops for x in costs)
    eager_f = sum(eager_flops(shape).values())
    peak = peak_tflops(device_name, shape.dtype)

    def rate(r: Result) -> str:
        # the plain-GEMM row runs the same GEMMs as fused; eager/compile the eager count
        flops = eager_f if r.name.startswith(("eager", "torch.compile")) else flops_fused
        tf = flops / (r.both_ms * 1e-3) / 1e12
        return f"{tf:.0f} | {num(None if peak is None else tf / peak, '{:.0%}')}"

    rows = ["| implementation | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | of peak | saved by fwd graph MiB "
            "| peak fwd+bwd MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {r.name} | {num(r.fwd_ms)} | {num(r.bwd_ms)} | {num(r.both_ms)} | {rate(r)} | "
             f"{num(r.saved_mib, '{:.1f}')} | {num(r.peak_mib, '{:.1f}')} |" for r in results]
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
        f"Shape: {shape.batch} x {shape.tokens} tokens, Cv={shape.cv}, C={shape.c}, N={shape.n}, T={shape.t} "
        f"({2 * shape.t - 1} MLPs), {str(shape.dtype).replace('torch.', '')}; stage-2 trainable set (router, own and "
        "cross adapters; foreign adapters and H frozen). Backward = autograd.grad of out, prob_sum and lse_sq_sum.",
        "", "Reproduce:", "", "```", command, "```", "", f"Targets: {TARGETS}.", "", *rows, "", *verdict, "",
        "## Cost model (analytic)", "", render_cost_model(shape), ""])


# Dense 16-bit tensor-core peaks (vendor figures, no sparsity), TFLOP/s, by device name.
_PEAKS_16BIT = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    if dtype == torch.float32:
        return None  # fp32 runs ieee FMA, not tensor cores: no single peak to quote
    for key, value in _PEAKS_16BIT.items():
        if key in device_name:
            return value
    return None


def render_cost_only(shape: Shape, command: str) -> str:
    """The file written without a GPU: the cost model only, said plainly."""
    return "\n".join([
        "# CT-MoA kernel benchmarks", "",
        f"**No GPU has run this benchmark (written {datetime.date.today().isoformat()} on a machine without "
        "CUDA).** There are no timings, no TFLOP/s and no measured memory below: only the analytic cost "
        "model of the fused path (`cost_model`, `saved_bytes` in `benchmark_ctmoa.py`), whose launch list "
        "the tests check against the launches the launchers record. On CPU the kernels ran only in "
        "Triton's interpreter (correctness: `kernels/tests_ctmoa/test_ctmoa*.py`) and were compiled ahead of time "
        "for sm_90 (`test_kernels_compile_for_sm90_without_a_gpu`, which also checks that the bf16 GEMM "
        "tiles lower to wgmma); neither says anything about speed.", "",
        f"Shape: {shape.batch} x {shape.tokens} tokens (M = {shape.m}), Cv={shape.cv}, C={shape.c}, N={shape.n}, "
        f"T={shape.t} ({2 * shape.t - 1} MLPs), {str(shape.dtype).replace('torch.', '')}; stage-2 trainable set "
        "(router, own and cross adapters; foreign adapters and H frozen).", "",
        "Reproduce (on a GPU node the same command also times fused, eager and torch.compile(reference), "
        "prints achieved TFLOP/s and the fraction of the device's peak, and judges the targets):", "",
        "```", command, "```", "", f"Targets: {TARGETS}.", "", "## Cost model (analytic)", "",
        "GEMM FLOPs count 2 m n k per GEMM. \"min. MB moved\" is each operand read once and each result "
        "written once (real traffic is higher: tiles re-read panels from L2). Eager is autograd on "
        "`ctmoa_reference`: the same forward GEMMs; backward dA = G W2, dW2, dW1 per trainable MLP, "
        "dW_r, and the frozen MLPs' dP from their saved outputs (element-wise). The fused backward runs "
        "exactly those GEMMs (it keeps Z of the trainable MLPs and Y of the frozen ones instead of "
        "recomputing), so the two columns are equal by design.", "",
        render_cost_model(shape), ""])


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the markdown table here (default: stdout)")
    p.add_argument("--batch", type=int, default=LLAVA_7B.batch)
    p.add_argument("--tokens", type=int, default=LLAVA_7B.tokens)
    p.add_argument("--cv", type=int, default=LLAVA_7B.cv)
    p.add_argument("--c", type=int, default=LLAVA_7B.c, help="the MLPs' hidden width C")
    p.add_argument("--n", type=int, default=0, help="the MLPs' output width N (default: C)")
    p.add_argument("--t", type=int, default=LLAVA_7B.t)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=100, help="do_bench time budget per measurement, ms")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes (needs TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    command = "python -m pilot_hpc_kernels.benchmark_ctmoa " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.tiny:
        shape, device = TINY, "cpu"
    else:
        shape = Shape(args.batch, args.tokens, args.cv, args.c, args.t, _dtype(args.dtype), args.n)
        device = "cuda"
        if not torch.cuda.is_available():
            print("benchmark_ctmoa: no CUDA GPU visible: writing the analytic cost model only, no timings",
                  file=sys.stderr)
            _write(render_cost_only(shape, command), args.out)
            return 0
    results = run(shape, device, args.reps, with_compile=not args.no_compile)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter; timings meaningless)"
    _write(render_markdown(results, shape, name, command, judge=device == "cuda"), args.out)
    return 0


def _write(text: str, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
