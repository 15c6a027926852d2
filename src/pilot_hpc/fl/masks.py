"""Pairwise masks of secure aggregation: the only module that imports `cryptography`.

Each client has an X25519 key pair. Two clients i < j of a round agree on a secret
(X25519: i's private key with j's public key gives what j's private key with i's public
key gives), stretch it with HKDF-SHA256 into a ChaCha20 key bound to the round and the
pair, and read that key's keystream as 64-bit words: mask(i, j). Client i adds mask(i, j)
to its fixed-point row, client j subtracts it, so every pair's words cancel in the sum
of the round's participants modulo 2^64 (fl/secagg.py).

Keys are derived, not drawn: the private key of client k is HKDF(run.seed, k). That keeps
a run reproducible (the same bits for any number of ranks, and after a resume), and it is
not what a deployment may do: there each client draws its private key at random and
keeps it to itself (docs/method.md, "Secure aggregation"). Anyone who knows run.seed
can recompute every mask here.

A mask stream can be read from any column on: ChaCha20's 32-bit block counter starts at
column // 8 (a 64-byte block holds 8 words), so a chunk's masks do not depend on how the
row was cut into chunks.
"""

from __future__ import annotations

import struct

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # an X25519 public key, raw
WORDS_PER_BLOCK = 8  # 64-byte ChaCha20 blocks of 8-byte words
# ChaCha20's block counter (RFC 7539) has 32 bits: a stream holds 2^32 blocks of 8 words.
MAX_COLUMNS = (1 << 32) * WORDS_PER_BLOCK

_KEY_SALT = b"pilot_hpc secure aggregation: client key"
_MASK_INFO = b"pilot_hpc secure aggregation: pair mask"


def _hkdf(material: bytes, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(material)


def private_key(seed: int, client: int) -> X25519PrivateKey:
    """Client `client`'s private key, derived from (run.seed, client) for reproducibility
    (module docstring: a deployment draws it at random on the client)."""
    raw = _hkdf(struct.pack("<Q", seed), info=struct.pack("<Q", client), salt=_KEY_SALT)
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of `key`'s public key: what travels (through the server)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pair_key(own: X25519PrivateKey, peer_public: bytes, round_: int, a: int, b: int) -> bytes:
    """The ChaCha20 key of clients a and b in `round_` (the same on both sides: X25519 is
    symmetric, and the pair is named in increasing order)."""
    lo, hi = min(a, b), max(a, b)
    if lo == hi:
        raise ValueError(f"pair_key: a client ({a}) has no mask with itself")
    secret = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _hkdf(secret, info=_MASK_INFO + struct.pack("<QQQ", round_, lo, hi))


def mask_words(key: bytes, start: int, count: int) -> np.ndarray:
    """Words start .. start + count - 1 of `key`'s keystream -> [count] uint64."""
    if start < 0 or count < 0 or start + count > MAX_COLUMNS:
        raise ValueError(f"mask_words: columns {start}..{start + count} outside a ChaCha20 stream of "
                         f"{MAX_COLUMNS} words")
    first, skip = divmod(start, WORDS_PER_BLOCK)
    blocks = -(-(skip + count) // WORDS_PER_BLOCK)
    nonce = struct.pack("<I", first) + bytes(12)  # the 4-byte block counter, then a zero nonce
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(64 * blocks))
    # Read-only words of the keystream, no copy (little-endian by ChaCha20's definition).
    return np.frombuffer(stream, dtype="<u8")[skip:skip + count].astype(np.uint64, copy=False)


def client_mask(keys: dict[int, bytes], client: int, start: int, count: int) -> np.ndarray:
    """Client `client`'s total mask over columns start .. start + count - 1: the sum, modulo
    2^64, of +mask(client, j) for every peer j > client and -mask(j, client) for j < client.
    keys: peer -> pair key. Over every participant these totals sum to zero."""
    total = np.zeros(count, dtype=np.uint64)
    for peer in sorted(keys):
        words = mask_words(keys[peer], start, count)
        if peer > client:
            total += words  # uint64 arithmetic wraps modulo 2^64: what the ring wants
        elif peer < client:
            total -= words
        else:
            raise ValueError(f"client_mask: client {client} lists itself among its peers")
    return total
