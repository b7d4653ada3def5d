"""Build hook for the optional C extension; all metadata lives in pyproject.toml.

The scanner has a pure-Python fallback, so the extension is optional: a
machine without a compiler still installs (setuptools only warns).
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "proxy.protocol._scan",
            sources=["proxy/protocol/_scan.c"],
            optional=True,
        ),
    ],
)
