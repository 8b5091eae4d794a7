"""Build bsa_ext: `pip install --no-build-isolation .` (see README for the knobs).

Two shared libraries, both against torch's stable ABI (one build loads under every
torch >= 2.10 and every CPython >= 3.11):
* ``bsa_ext/_C``: the operator schemas, always built (a C++ compiler is enough);
* ``bsa_ext/_cuda``: the CUDA kernels, built when a CUDA toolkit and a CUDA build of
  torch are present, for the archs in ``BSA_CUDA_ARCHS`` (default ``80;90a``).

Environment: ``BSA_SKIP_CUDA_BUILD=1`` never builds the kernels; ``BSA_FORCE_CUDA=1``
fails instead of skipping when they cannot be built; ``MAX_JOBS`` bounds parallel
compilation; ``CUDA_HOME`` overrides toolkit discovery.
"""

import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_TARGET = "-DTORCH_TARGET_VERSION=0x020a000000000000"  # torch 2.10: oldest ABI we promise


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _real_cuda_home():
    """The toolkit root, also when `nvcc` on PATH is a wrapper script outside it."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for home in candidates:
        # A real toolkit has the runtime headers beside its compiler.
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


cuda_home = _real_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

archs = [a.strip() for a in os.environ.get("BSA_CUDA_ARCHS", "80;90a").replace(",", ";").split(";") if a.strip()]


def _cuda_skip_reason():
    if _flag("BSA_SKIP_CUDA_BUILD"):
        return "BSA_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    return None


skip_reason = _cuda_skip_reason()
if skip_reason and _flag("BSA_FORCE_CUDA") and not _flag("BSA_SKIP_CUDA_BUILD"):
    sys.exit(f"bsa_ext: BSA_FORCE_CUDA=1 but the CUDA kernels cannot be built: {skip_reason}")

# py_limited_api=True makes torch add -DPy_LIMITED_API itself.
common_cxx = ["-O3", "-std=c++17", TORCH_TARGET]
ext_modules = [
    CppExtension(
        "bsa_ext._C",
        ["csrc/schema.cpp"],
        extra_compile_args={"cxx": common_cxx},
        py_limited_api=True,
    )
]

if skip_reason is None:
    gencode = []
    for arch in archs:
        gencode.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    ext_modules.append(
        CUDAExtension(
            "bsa_ext._cuda",
            ["csrc/bindings_cuda.cpp"] + sorted(glob.glob("csrc/instantiations/*.cu")),  # one file per kernel
            include_dirs=[os.path.join(ROOT, "csrc", "include")],
            extra_compile_args={
                "cxx": common_cxx,
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", TORCH_TARGET]
                + gencode,
            },
            py_limited_api=True,
        )
    )

# Recorded for `python -m bsa_ext info`; written before build_py copies the package.
kernel_files = sorted(glob.glob("csrc/instantiations/*.cu")) if skip_reason is None else []
build_info = {
    "cuda_built": skip_reason is None,
    "cuda_kernels": [os.path.basename(f)[: -len(".cu")] for f in kernel_files],
    "cuda_skip_reason": skip_reason,
    "cuda_archs": archs if skip_reason is None else [],
    "cuda_version": torch.version.cuda,
    "built_with_torch": torch.__version__.split("+")[0],
}
with open(os.path.join(ROOT, "bsa_ext", "_build_info.json"), "w") as f:
    json.dump(build_info, f, indent=1)

what = f"CUDA kernels for sm_{', sm_'.join(archs)}" if skip_reason is None else f"no CUDA kernels ({skip_reason})"
print(f"bsa_ext build: operator schemas + {what}; toolkit: {cuda_home or 'none'}", flush=True)

setup(
    name="bsa_ext",
    packages=find_packages(include=["bsa_ext", "bsa_ext.*"]),
    package_data={"bsa_ext": ["_build_info.json", "data/*.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
