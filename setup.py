"""Build hook for the optional C extensions; all metadata lives in pyproject.toml.

The response scanner and the digest key's literal pass have pure-Python fallbacks, so both
are optional: a machine without a compiler still installs (setuptools only warns).
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "proxy.protocol._scan",
            sources=["proxy/protocol/_scan.c"],
            optional=True,
        ),
        Extension(
            "proxy.routing.classify._lexkey",
            sources=["proxy/routing/classify/_lexkey.c"],
            optional=True,
        ),
    ],
)
