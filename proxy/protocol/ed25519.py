"""MariaDB's client_ed25519 authentication: the token for a backend account created
`IDENTIFIED VIA ed25519`, and the check of a client logging in to rwproxy with it.

The server sends a 32-byte scramble; the client answers with an Ed25519 signature of it.
MariaDB's variant derives the key from the password itself rather than from a 32-byte
seed: the 64-byte expanded secret is SHA-512(password), whose first half (clamped) is the
secret scalar and whose second half seeds the nonce. Standard Ed25519 APIs only take a
seed, so the signature is assembled here from libsodium's scalar and point primitives
(PyNaCl, which PyMySQL also uses for this plugin, so the monitor's connections can log in
to such accounts too).
"""

from __future__ import annotations

import hashlib


def _bindings():
    try:
        import nacl.bindings
    except ImportError as e:  # a dependency of rwproxy; this says what a hand-made install lacks
        raise RuntimeError("client_ed25519 needs the PyNaCl package (pip install pynacl)") from e
    return nacl.bindings


def _secret(password: bytes) -> tuple[bytes, bytes, bytes]:
    """(secret scalar mod L, nonce seed, public key) for a password."""
    nb = _bindings()
    h = hashlib.sha512(password).digest()
    a = bytearray(h[:32])
    a[0] &= 248  # Ed25519 clamping of the secret scalar
    a[31] &= 63
    a[31] |= 64
    public = nb.crypto_scalarmult_ed25519_base_noclamp(bytes(a))
    return nb.crypto_core_ed25519_scalar_reduce(bytes(a) + bytes(32)), h[32:], public


def sign(password: bytes, scramble: bytes) -> bytes:
    """The 64-byte signature R || S of `scramble` under the key derived from `password`."""
    nb = _bindings()
    a, seed, public = _secret(password)
    r = nb.crypto_core_ed25519_scalar_reduce(hashlib.sha512(seed + scramble).digest())
    big_r = nb.crypto_scalarmult_ed25519_base_noclamp(r)
    k = nb.crypto_core_ed25519_scalar_reduce(hashlib.sha512(big_r + public + scramble).digest())
    return big_r + nb.crypto_core_ed25519_scalar_add(r, nb.crypto_core_ed25519_scalar_mul(k, a))


def verify(password: bytes, scramble: bytes, signature: bytes) -> bool:
    """A client's answer checked as the server does: a standard Ed25519 signature of the
    scramble under the public key derived from the password."""
    nb = _bindings()
    if len(signature) != 64:
        return False
    try:
        nb.crypto_sign_open(signature + scramble, _secret(password)[2])
    except Exception:  # nacl.exceptions.BadSignatureError, or a malformed point
        return False
    return True
