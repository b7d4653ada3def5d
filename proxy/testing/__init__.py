"""Helpers for tests and benchmarks only (the runtime never imports them; tests/test_architecture.py
checks): a raw protocol client, client load generators, sandbox clusters for a test session."""
