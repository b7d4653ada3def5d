"""The MySQL/MariaDB client/server protocol: constants, packets (framing, OK/ERR/EOF, the execute
rewriter), handshake, auth plugins (native, caching_sha2, ed25519), and scan, the response-boundary
scanner (C extension with a pure-Python twin). Depends on nothing else in rwproxy."""
