"""Builds the native extension ``mgm_fast._C`` with torch.utils.cpp_extension and ninja.

* CPU C++ kernels (``csrc/kernels/cpu``) and their torch glue (``csrc/bindings``) always.
* CUDA kernels (``csrc/kernels/cuda``) and their glue (``csrc/bindings/cuda``) only when the
  installed torch was built with CUDA. ``TORCH_CUDA_ARCH_LIST`` is honoured; without it and
  without a visible GPU we target sm_80 and sm_90.
* ``MGM_FAST_NO_EXT=1`` skips the extension (pure-Python install; the reference backends work).

Install with ``pip install -e . --no-build-isolation`` after torch is installed (build
isolation would pull a different torch into the build environment).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("MGM_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    openmp = ["-fopenmp"]
    # `import mgm_fast._C` must work before `import torch`: record torch's lib dir (libc10,
    # libtorch) as a run path; the module itself imports torch when it initialises.
    torch_rpath = [f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"]
    # No -std flag: torch's BuildExtension picks the standard its headers need (C++17 for older
    # torch, C++20 for torch >= 2.13; torch 2.14's headers #error below C++20). The kernels are
    # C++17 (CMakeLists.txt checks that) and compile as C++20 too.
    cxx_flags = ["-O3", *openmp]
    sources = _sources("csrc/kernels/cpu/*.cpp") + _sources("csrc/bindings/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    with_cuda = torch.version.cuda is not None and os.environ.get("MGM_FAST_NO_CUDA") != "1"
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += _sources("csrc/kernels/cuda/*.cu") + _sources("csrc/bindings/cuda/*.cpp")
        define_macros.append(("MGM_FAST_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "mgm_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=openmp + torch_rpath,
        )
    else:
        ext = CppExtension(
            "mgm_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp + torch_rpath,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
