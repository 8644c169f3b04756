"""The one thing pyproject.toml cannot say: the optional C fast path of the TFTP server.

`optional=True`: where no compiler or Python headers are at hand the build goes on
without it and the server runs its pure-Python loop (pxe/tftp_server.py says how).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pxe._lockstep",
            ["pxe/_lockstep.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
