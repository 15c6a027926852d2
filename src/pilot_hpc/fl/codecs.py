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
(3.76x / 7.11x) for a bound set by a smaller block maximum; on Gaussian rows the two
bounds differ little, and absmax grows only with the log of the block size
(`python -m pilot_hpc.tools.bench_codecs` prints the measured mean error per block size).

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
    x = x.float()
    blank = None
    if nan_rows:
        blank = torch.isnan(x).all(dim=1) if x.shape[1] else torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if bool(blank.any()):
            x = torch.where(blank[:, None], torch.zeros((), device=x.device), x)
        else:
            blank = None
    _check_finite(x, codec, where)
    r, n = x.shape
    if codec in _DTYPES:
        out = x.to(_DTYPES[codec]).contiguous().view(torch.uint8).reshape(r, -1)
        if blank is not None:
            out[blank] = torch.full((1,), float("nan"), dtype=_DTYPES[codec]).view(torch.uint8).to(x.device).repeat(n)
        return out
    full = n - n % BLOCK
    parts = []
    if full:
        parts.append(_encode_blocks(x[:, :full].reshape(r, -1, BLOCK), codec, blank).reshape(r, -1))
    if n > full:
        parts.append(_encode_blocks(x[:, full:].reshape(r, 1, n - full), codec, blank).reshape(r, -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _encode_blocks(xb: torch.Tensor, codec: str, blank: torch.Tensor | None) -> torch.Tensor:
    """[R, nb, m] float32 -> [R, nb, 4 + code bytes of m] uint8 (scale first)."""
    qmax = _QMAX[codec]
    absmax = xb.abs().amax(dim=2, keepdim=True)
    scale = absmax / qmax
    # Division, not a reciprocal: 1 / a subnormal scale overflows to inf.
    q = torch.where(scale > 0, xb / torch.where(scale > 0, scale, 1.0), 0.0).round_().clamp_(-qmax, qmax)
    if blank is not None:
        scale = scale.masked_fill(blank[:, None, None], float("nan"))
    if codec == "int8":
        codes = q.to(torch.int8).view(torch.uint8)
    else:
        u = (q + 8).to(torch.uint8)
        if u.shape[2] % 2:
            u = torch.cat([u, torch.full_like(u[..., :1], 8)], dim=2)
        codes = u[..., 0::2] | (u[..., 1::2] << 4)
    return torch.cat([scale.contiguous().view(torch.uint8), codes], dim=2)


def decode_rows(raw: torch.Tensor, codec: str, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """[R, nbytes(n)] uint8 -> [R, n] float32 (written into `out` when given)."""
    if raw.dim() == 1:
        return decode_rows(raw[None], codec, n, None if out is None else out[None])[0]
    r = raw.shape[0]
    if raw.shape[1] != nbytes(codec, n):
        raise ValueError(f"codec {codec}: {raw.shape[1]} bytes per row, {n} values need {nbytes(codec, n)}")
    if out is None:
        out = torch.empty(r, n, dtype=torch.float32, device=raw.device)
    if codec in _DTYPES:
        out.copy_(raw.contiguous().view(_DTYPES[codec]).reshape(r, n))
        return out
    full = n - n % BLOCK
    if full:
        nb = full // BLOCK
        blocks = raw[:, :nb * block_bytes(codec)].reshape(r, nb, block_bytes(codec))
        out[:, :full].view(r, nb, BLOCK).copy_(_decode_blocks(blocks, codec, BLOCK))
    if n > full:
        tail = raw[:, nbytes(codec, full):].reshape(r, 1, -1)
        out[:, full:].view(r, 1, n - full).copy_(_decode_blocks(tail, codec, n - full))
    return out


def _decode_blocks(blocks: torch.Tensor, codec: str, m: int) -> torch.Tensor:
    # A copy: a view of the scale bytes is not 4-byte strided.
    scale = blocks[..., :4].flatten().clone().view(torch.float32).view(*blocks.shape[:2], 1)  # [R, nb, 1]
    codes = blocks[..., 4:]
    if codec == "int8":
        q = codes.contiguous().view(torch.int8).float()
    else:
        q = torch.stack([codes & 15, codes >> 4], dim=3).reshape(*codes.shape[:2], -1)[..., :m].float() - 8.0
    return q * scale


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
