"""setuptools hook: ship the CUDA kernel sources (top-level cuda/) inside the package.

Everything else is declared in setup.cfg. The kernels are compiled on first use by
torch.utils.cpp_extension (rwkv_bone/wkv/cuda.py), so a wheel carries their sources: build_py
copies cuda/*.cu and cuda/*.cpp to rwkv_bone/wkv/cuda_src/ in the build, where an installed
rwkv_bone looks for them first (a source checkout uses cuda/ directly).
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNEL_SOURCES = sorted([*ROOT.glob("cuda/*.cu"), *ROOT.glob("cuda/*.cpp")])


class BuildWithKernelSources(build_py):
    def run(self) -> None:
        super().run()
        if not KERNEL_SOURCES:
            raise RuntimeError("cuda/*.cu and cuda/*.cpp are missing from the source tree; cannot build rwkv-bone")
        target = Path(self.build_lib) / "rwkv_bone" / "wkv" / "cuda_src"
        target.mkdir(parents=True, exist_ok=True)
        for src in KERNEL_SOURCES:
            self.copy_file(str(src), str(target / src.name))


setup(cmdclass={"build_py": BuildWithKernelSources})
