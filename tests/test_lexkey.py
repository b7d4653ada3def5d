"""The C literal pass of the digest-cache key (proxy/_lexkey.c) against the regex it replaces.

Every relayed statement's cache key comes from literal_key() when the extension is built, so
any byte it gets wrong would let two differently-classified statements share a cache entry.
The contract: None, or exactly _B_LIT.sub(b"?", raw); and cache_key() is the same with and
without it. Without the extension these tests skip, unless RWPROXY_REQUIRE_C=1 (CI).
"""

from __future__ import annotations

import random

import pytest

from proxy.routing.classify import lex as L
from proxy.routing.classify import Classifier

from helpers import require_c
from test_classify import CORPUS


def _c():
    return require_c(L._c_literal_key, "proxy.routing.classify._lexkey")


def _py_key(raw: bytes) -> bytes:
    saved = L._literal_key
    L._literal_key = None
    try:
        return L.cache_key(raw)
    finally:
        L._literal_key = saved


@pytest.mark.parametrize("raw,want", [
    (b"SELECT c FROM sbtest1 WHERE id=5044", b"SELECT c FROM sbtest1 WHERE id=?"),
    (b"UPDATE t SET k=k+1, s='it''s', d=\"a\\\"b\" WHERE id=-7", b"UPDATE t SET k=k+?, s=?, d=? WHERE id=-?"),
    (b"SELECT 0x1F, 0b101, 1.5e-3, .5, 1., 3e5, X'0a'", b"SELECT ?, ?, ?, ?, ?, ?, X?"),
    (b"SELECT t1.c5, @v1, $x2, 1abc, 0xZZ, 0b12, 1e, 1.2.3", b"SELECT t1.c5, @v1, $x2, 1abc, 0xZZ, 0b12, 1e, ?.3"),
    (b"SELECT 1.x, 'a\\'b', 'caf\xc3\xa9', 5\xc3\xa9", b"SELECT ?.x, ?, ?, 5\xc3\xa9"),
    (b"SELECT a-b, a/b, 7-1", b"SELECT a-b, a/b, ?-?"),
    (b"", b""),
])
def test_known_texts(raw, want):
    lk = _c()
    assert lk(raw) == want == L._B_LIT.sub(b"?", raw)


@pytest.mark.parametrize("raw", [
    b"SELECT 1 -- comment", b"SELECT 1 # comment", b"SELECT /* c */ 1", b"SELECT `id` FROM t",
    b"SELECT 'open", b"SELECT \"open", b"SELECT 'ends in backslash\\", b"SELECT 'a''",
])
def test_special_texts_fall_back_to_the_regex(raw):
    """Comments, backticks and unclosed quotes are the regex path's business (None from C),
    and cache_key still gives what it gave before the C pass existed."""
    lk = _c()
    assert lk(raw) is None
    assert L.cache_key(raw) == _py_key(raw)


def test_not_bytes_is_left_to_the_regex():
    lk = _c()
    assert lk(bytearray(b"SELECT 1")) is None
    assert lk(memoryview(b"SELECT 1")) is None
    assert L.cache_key(bytearray(b"SELECT 1")) == b"SELECT ?"


def test_random_texts_match_the_regex():
    """Random texts over the characters the lexer cares about: C agrees with the regex on
    every one it answers, and answers most of those without comment markers."""
    lk = _c()
    rng = random.Random(20261122)
    alphabet = list(b"'\"\\0123456789..xXbBeE+-_$@aZ ,()=?/*#`\n") + [0x80, 0xC3, 0xA9]
    answered = plain = 0
    for _ in range(60000):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        got = lk(raw)
        if got is not None:
            answered += 1
            assert got == L._B_LIT.sub(b"?", raw), raw
        assert L.cache_key(raw) == _py_key(raw), raw
        if not any(m in raw for m in (b"#", b"`", b"--", b"/*", b"'", b'"')):
            plain += 1
            assert got is not None, raw
    assert answered > 10000 and plain > 1000


def test_corpus_keys_and_classifications_unchanged():
    """The classifier corpus: same key with and without the C pass, and a classifier using it
    still classifies every statement as the corpus says (cached path = full path)."""
    _c()
    for sql, *_ in CORPUS:
        raw = sql.encode() if isinstance(sql, str) else sql
        assert L.cache_key(raw) == _py_key(raw), raw
    clf = Classifier()
    for sql, *_ in CORPUS:
        raw = sql.encode() if isinstance(sql, str) else sql
        assert clf.classify(raw) == clf.full_classify(raw), raw
