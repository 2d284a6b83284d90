"""Build spa3d's optional C kernels (plain C, loaded with ctypes).

Everything else is in pyproject.toml. Without a C compiler the build of the
kernels is skipped and spa3d uses its (slower) torch code path instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "spa3d.kernels._trilinear",
            sources=["src/spa3d/kernels/trilinear.c", "src/spa3d/kernels/posterior.c"],
            depends=["src/spa3d/kernels/threads.h"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
