"""The one compiled part: the log summary's native scanner, optional.

Everything else is declared in setup.cfg. Without a C compiler the build goes on without
the scanner and ``ballast logs summarize`` uses its other engines.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ballast.logs._scan",
            ["framework/logs/_scan.c"],
            extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE"],
            optional=True,
        )
    ]
)
