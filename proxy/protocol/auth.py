"""Authentication plugins: scrambles for both sides of the handshake.

The proxy knows each user's password (from the config), so it can verify a
client's token by computing the expected one, and compute the token it sends
to a backend for the same user.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from proxy.protocol import ed25519

NATIVE = "mysql_native_password"
CACHING_SHA2 = "caching_sha2_password"
CLEAR = "mysql_clear_password"
ED25519 = "client_ed25519"
SUPPORTED = (NATIVE, CACHING_SHA2)  # what clients may use to log in to rwproxy
BACKEND = (NATIVE, CACHING_SHA2, ED25519, CLEAR)  # what rwproxy answers when a backend asks

# caching_sha2_password protocol bytes (sent after a 0x01 "more data" byte).
SHA2_FAST_AUTH_OK = b"\x03"
SHA2_PERFORM_FULL_AUTH = b"\x04"
SHA2_REQUEST_PUBLIC_KEY = b"\x02"


def nonce() -> bytes:
    """20 random bytes in 1..127, as MySQL servers send (no NUL, 7-bit)."""
    return bytes(b % 127 + 1 for b in os.urandom(20))


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def _scramble(hash_fn, password: str | bytes, salt: bytes, salt_first: bool) -> bytes:
    """H(pw) XOR H(salt + H(H(pw))) (salt_first) or H(pw) XOR H(H(H(pw)) + salt): the token both
    scrambling plugins send instead of the password."""
    if not password:
        return b""
    pw = password.encode() if isinstance(password, str) else password
    h1 = hash_fn(pw).digest()
    h2 = hash_fn(h1).digest()
    return _xor(h1, hash_fn(salt[:20] + h2 if salt_first else h2 + salt[:20]).digest())


def native_token(password: str | bytes, salt: bytes) -> bytes:
    """mysql_native_password: SHA1(pw) XOR SHA1(salt + SHA1(SHA1(pw)))."""
    return _scramble(hashlib.sha1, password, salt, True)


def sha2_token(password: str | bytes, salt: bytes) -> bytes:
    """caching_sha2_password fast path: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + salt)."""
    return _scramble(hashlib.sha256, password, salt, False)


class Stage1(bytes):
    """SHA1(password): all mysql_native_password needs to log in, without the password itself.
    What rwproxy holds for an account that exists only on the server ([auth] server_accounts):
    recovered from the client's answer and the server's stored hash (native_stage1)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Stage1(...)"  # never in a log


def native_stage1(stored: bytes, salt: bytes, token: bytes) -> Stage1 | None:
    """The client's SHA1(password), if `token` answers `salt` for the account whose stored
    mysql_native_password hash is `stored` (SHA1(SHA1(password)), the 20 bytes behind '*'):
    token XOR SHA1(salt + stored) is SHA1(password) exactly when SHA1 of it is `stored`."""
    if len(token) != 20 or len(stored) != 20:
        return None
    h1 = _xor(token, hashlib.sha1(salt[:20] + stored).digest())
    return Stage1(h1) if hmac.compare_digest(hashlib.sha1(h1).digest(), stored) else None


def token_for(plugin: str, password, salt: bytes) -> bytes:
    """The answer to `salt` for `plugin`, from a clear password or (native only) a Stage1."""
    if isinstance(password, Stage1):
        if plugin != NATIVE:
            raise ValueError(f"the server asks for {plugin}, and rwproxy holds only this account's "
                             f"mysql_native_password hash ([auth] server_accounts covers that plugin alone)")
        return _xor(password, hashlib.sha1(salt[:20] + hashlib.sha1(password).digest()).digest())
    if plugin == NATIVE:
        return native_token(password, salt)
    if plugin == CACHING_SHA2:
        return sha2_token(password, salt)
    if plugin == CLEAR:
        return password.encode() + b"\x00"
    if plugin == ED25519:
        return ed25519.sign(password.encode(), salt[:32])
    raise ValueError(f"unsupported authentication plugin {plugin!r}")


def verify(plugin: str, password: str, salt: bytes, token: bytes) -> bool:
    """Constant-time check of a client's scrambled password."""
    token = token.rstrip(b"\x00") if not password else token
    return hmac.compare_digest(token_for(plugin, password, salt), token)


class RSAKeyPair:
    """The RSA key pair for caching_sha2_password's key exchange without TLS."""

    def __init__(self, private_pem: bytes | None = None):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        if private_pem:
            self._key = serialization.load_pem_private_key(private_pem, password=None)
        else:
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def decrypt_password(self, ciphertext: bytes, salt: bytes) -> bytes:
        """Undo the client's RSA-OAEP(password\\0 XOR salt); returns the password without NUL."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        plain = self._key.decrypt(
            ciphertext,
            padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
        )
        salt = salt[:20]
        clear = bytes(c ^ salt[i % len(salt)] for i, c in enumerate(plain))
        return clear.rstrip(b"\x00")
