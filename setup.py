"""Build steps that pyproject.toml cannot express declaratively.

1. Generate the Python protobuf/gRPC modules from proto/ into agent/api/v1/
   (never committed; proto/ mirrors the package path so the generated
   imports are `from agent.api.v1 import ..._pb2`).
2. Compile the C extension agent._native from native/.
"""

import glob
import os
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent


def generate_protos():
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(glob.glob(str(HERE / "proto" / "agent" / "**" / "*.proto"), recursive=True))
    if not protos:
        return
    wkt = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{HERE / 'proto'}",
        f"-I{wkt}",
        f"--python_out={HERE}",
        f"--pyi_out={HERE}",
        f"--grpc_python_out={HERE}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed for " + " ".join(protos))


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


native_sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "native").glob("*.c"))

setup(
    cmdclass={"build_py": BuildPyWithProtos},
    ext_modules=[
        Extension(
            "agent._native",
            sources=native_sources,
            depends=sorted(str(p.relative_to(HERE)) for p in (HERE / "native").glob("*.h")),
            libraries=["crypto", "xxhash", "zstd", "nfs", "iscsi", "pthread"],
            extra_compile_args=[
                "-O3",
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-fvisibility=hidden",
            ],
        )
    ],
)
