"""Codecs of the exchange (fl.codec up, fl.codec_down back): a float32 row <-> its bytes.

Pure functions on torch tensors (any device), no MPI. A row of n values encodes to
`nbytes(n)` bytes laid out block by block, so that columns a..b of a row (a, b multiples
of BLOCK, or b = n) are the contiguous bytes span(a, b): the streamed exchange moves
column chunks of encoded rows without re-encoding.

  float32   the value's 4 bytes (lossless)
  bfloat16  its 2 bytes rounded to nearest even (relative error <= 2^-9)
  int8      per block of BLOCK values: its float32 scale s = absmax / 127, then one byte
            q = round(x / s) in [-127, 127]; decode q * s, so |x - decode| <= s / 2
  int4      the same with s = absmax / 7 and q in [-7, 7], two values per byte (low
            nibble first, q + 8 stored), so |x - decode| <= s / 2

BLOCK = 128: the scale costs 4 / BLOCK bytes per value (int8: 1.031 bytes a value,
3.88x fewer than float32; int4: 0.531, 7.53x fewer). 64 would cost 1.0625 / 0.5625
(3.76x / 7.11x) for a mean error 1.22x smaller on heavy-tailed rows
(`python -m pilot_hpc.tools.bench_codecs` measures it per block size; BENCHMARKS.md).

Near the bottom of the float32 range (a block maximum below ~1e-36) the scale is
subnormal and loses relative precision; the error then also carries an absolute part
of at most 128 x 2^-149 (the stated bound adds 2^-140). A row's last block may be short:
its padding is zeros and does not travel. NaN and Inf are refused by name (a client
with a non-finite update is excluded before encoding, so one reaching a codec is a bug);
the server's "no answer" rows (all NaN, a plan row without contributor) travel on the
way back as a NaN scale (`encode_rows(..., nan_rows=True)`).
"""

from __future__ import annotations

import torch

BLOCK = 128
CODECS = ("float32", "bfloat16", "int8", "int4")
LOSSY_INT = ("int8", "int4")
_QMAX = {"int8": 127, "int4": 7}
_CODE_BYTES = {"int8": BLOCK, "int4": BLOCK // 2}  # per full block, scale excluded
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CodecError(ValueError):
    """A value a codec cannot carry (NaN/Inf), named with where it was met."""


def block_bytes(codec: str) -> int:
    """Bytes of one full block (int codecs) or of one value (float codecs)."""
    if codec in _DTYPES:
        return _DTYPES[codec].itemsize
    return 4 + _CODE_BYTES[codec]


def nbytes(codec: str, n: int) -> int:
    """Encoded bytes of a row of n values."""
    if codec in _DTYPES:
        return n * _DTYPES[codec].itemsize
    full, tail = divmod(n, BLOCK)
    tail_bytes = 0 if tail == 0 else 4 + (tail if codec == "int8" else (tail + 1) // 2)
    return full * block_bytes(codec) + tail_bytes


def span(codec: str, a: int, b: int) -> tuple[int, int]:
    """The bytes of columns a..b of an encoded row; a must start a block (int codecs)."""
    if codec not in _DTYPES and a % BLOCK:
        raise ValueError(f"codec {codec}: column {a} does not start a block of {BLOCK}")
    start = nbytes(codec, a)
    return start, start + nbytes(codec, b - a)


def _check_finite(x: torch.Tensor, codec: str, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise CodecError(f"codec {codec}: {bad} non-finite value(s) (NaN/Inf) in {where}; a non-finite update must "
                         "be excluded before it is encoded")


def encode_rows(x: torch.Tensor, codec: str, where: str = "the update", nan_rows: bool = False) -> torch.Tensor:
    """[R, n] float32 -> [R, nbytes(n)] uint8. nan_rows: a row that is all NaN (a plan's
    "no answer") is carried as such; any other non-finite value is refused."""
    if x.dim() == 1:
        return encode_rows(x[None], codec, where, nan_rows)[0]
    x = x.float().contiguous()
    r, n = x.shape
    blank = None
    if nan_rows and n:
        # A "no answer" row is NaN everywhere; rows whose first value is NaN are checked whole.
        first = torch.isnan(x[:, 0])
        if bool(first.any()):
            blank = first.clone()
            blank[first] = torch.isnan(x[first]).all(dim=1)
            x = torch.where(blank[:, None], torch.zeros((), device=x.device), x)
    if codec in _DTYPES:
        _check_finite(x, codec, where)
        out = x.to(_DTYPES[codec]).view(torch.uint8).reshape(r, -1)
        if blank is not None and bool(blank.any()):
            nan = torch.full((n,), float("nan"), dtype=_DTYPES[codec], device=x.device).view(torch.uint8)
            out[blank] = nan
        return out
    out = torch.empty(r, nbytes(codec, n), dtype=torch.uint8, device=x.device)
    full, bb = n - n % BLOCK, block_bytes(codec)
    nb = full // BLOCK
    tile = max(nb, 1) if x.is_cuda else TILE  # cache-sized temporaries on a CPU, one launch per op on a GPU
    xb, ob = x[:, :full].view(r, nb, BLOCK), out[:, :nb * bb].view(r, nb, bb)
    for t in range(0, nb, tile):
        _encode_tile(xb[:, t:t + tile], ob[:, t:t + tile], codec, blank, where)
    if n > full:
        _encode_tile(x[:, full:].reshape(r, 1, n - full), out[:, nb * bb:].view(r, 1, -1), codec, blank, where)
    return out


# Blocks per step on a CPU: 2048 x 128 float32 values (1 MiB) keep every temporary in cache.
TILE = 2048


def _encode_tile(xb: torch.Tensor, ob: torch.Tensor, codec: str, blank: torch.Tensor | None, where: str) -> None:
    """xb [R, t, m] float32 -> ob [R, t, 4 + code bytes of m] uint8 (scale first), in place."""
    qmax = _QMAX[codec]
    absmax = xb.abs().amax(dim=2, keepdim=True)  # NaN and Inf propagate (torch.linalg.vector_norm(inf): 100x slower on a CPU)
    if not bool(torch.isfinite(absmax).all()):
        _check_finite(xb, codec, where)
    scale = absmax / qmax
    # Division, not a reciprocal: 1 / a subnormal scale overflows to inf. A zero scale
    # (a zero block, or one below 127 x 2^-149) divides by 1: its values round to 0.
    q = torch.div(xb, torch.where(scale > 0, scale, 1.0)).round_().clamp_(-qmax, qmax)
    if blank is not None:
        scale = scale.masked_fill(blank[:, None, None], float("nan"))
    ob[..., :4].copy_(scale.view(torch.uint8))
    if codec == "int8":
        ob[..., 4:].view(torch.int8).copy_(q)
        return
    if q.shape[2] % 2:  # a short last block of odd length: its missing value codes as 0
        q = torch.cat([q, torch.zeros_like(q[..., :1])], dim=2)
    # (lo + 8) + 16 (hi + 8), in float (exact below 2^24), converted once: fewer passes than bit ops.
    ob[..., 4:].copy_(torch.add(q[..., 0::2], q[..., 1::2], alpha=16).add_(136))


def decode_rows(raw: torch.Tensor, codec: str, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """[R, nbytes(n)] uint8 -> [R, n] float32 (written into `out` when given)."""
    if raw.dim() == 1:
        return decode_rows(raw[None], codec, n, None if out is None else out[None])[0]
    r = raw.shape[0]
    if raw.shape[1] != nbytes(codec, n):
        raise ValueError(f"codec {codec}: {raw.shape[1]} bytes per row, {n} values need {nbytes(codec, n)}")
    if out is None:
        out = torch.empty(r, n, dtype=torch.float32, device=raw.device)
    raw = raw.contiguous()
    if codec in _DTYPES:
        out.copy_(raw.view(_DTYPES[codec]).reshape(r, n))
        return out
    full, bb = n - n % BLOCK, block_bytes(codec)
    nb = full // BLOCK
    tile = max(nb, 1) if raw.is_cuda else TILE
    blocks, ob = raw[:, :nb * bb].view(r, nb, bb), out[:, :full].view(r, nb, BLOCK)
    for t in range(0, nb, tile):
        _decode_tile(blocks[:, t:t + tile], ob[:, t:t + tile], codec)
    if n > full:
        _decode_tile(raw[:, nb * bb:].reshape(r, 1, -1), out[:, full:].view(r, 1, n - full), codec)
    return out


def _decode_tile(blocks: torch.Tensor, out: torch.Tensor, codec: str) -> None:
    """blocks [R, t, 4 + code bytes] uint8 -> out [R, t, m] float32, in place."""
    # A copy: a view of the scale bytes is not 4-byte strided.
    scale = blocks[..., :4].flatten().clone().view(torch.float32).view(*blocks.shape[:2], 1)  # [R, t, 1]
    codes = blocks[..., 4:]
    if codec == "int8":
        torch.mul(codes.view(torch.int8), scale, out=out)
        return
    m = out.shape[2]
    q = torch.stack([codes & 15, codes >> 4], dim=3).view(*codes.shape[:2], -1)[..., :m]
    torch.mul(q.view(torch.int8) - 8, scale, out=out)


def roundtrip(x: torch.Tensor, codec: str, where: str = "the update") -> tuple[torch.Tensor, torch.Tensor]:
    """(encoded bytes, decoded float32) of a flat row."""
    raw = encode_rows(x, codec, where)
    return raw, decode_rows(raw, codec, x.numel())


def bound(x: torch.Tensor, codec: str) -> torch.Tensor:
    """Per value, the largest |x - decode(encode(x))| the codec allows (tests, docs)."""
    x = x.float().reshape(-1)
    if codec == "float32":
        return torch.zeros_like(x)
    if codec == "bfloat16":
        return x.abs() * 2.0 ** -8 + 2.0 ** -133  # half an ulp of 8 mantissa bits, subnormals' absolute step
    n = x.numel()
    pad = (-n) % BLOCK
    xb = torch.cat([x, x.new_zeros(pad)]).view(-1, BLOCK)
    absmax = xb.abs().amax(dim=1, keepdim=True)
    # s / 2, plus float32 rounding of x / s and q * s (a few ulps of absmax), plus the
    # absolute error of a subnormal scale (module docstring).
    per = absmax / _QMAX[codec] / 2 + absmax * 2.0 ** -21 + 2.0 ** -140
    return per.expand(-1, BLOCK).reshape(-1)[:n]


def apply_error_feedback(delta: torch.Tensor, residual: torch.Tensor | None, codec: str,
                         where: str = "the update") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Client-side error feedback: x = delta + residual travels as Q(x), and the new
    residual x - decode(Q(x)) is carried into the next round.
    -> (encoded bytes, decoded values, new residual)."""
    x = delta.float() if residual is None else delta.float() + residual.to(delta.device)
    raw, dec = roundtrip(x, codec, where)
    return raw, dec, x - dec
