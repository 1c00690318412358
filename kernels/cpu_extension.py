"""darl_infer's C++ CPU ops (`kernels/*_cpu.cpp`), built on first use into one library and loaded as
`torch.ops.darl_infer_cpu`.

On a CPU the work between the matmuls runs as PyTorch ops, each a pass over the tensor (an RMSNorm
is ~8); the C++ ops do each such step in one pass. They are built with torch's JIT extension loader
(a C++ compiler and ninja, which torch.compile's CPU code needs too) for the SIMD level PyTorch
dispatches to on this CPU (AVX-512, AVX2, or portable code; with AVX-512 also AVX-512-BF16 and AMX
where the CPU has them), once per machine, checkout and version of the sources: ~15 s (a line on
stderr says so), then cached in darl_infer's cache folder
(DARL_INFER_CACHE, by default ~/.cache/darl_infer) under cpu_kernels/. Where the build fails,
`cpu_ops()` warns once and returns None, and callers keep PyTorch's path; DARL_INFER_CPU_KERNELS=0
turns the ops off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

# the flags ATen builds its own kernels of each level with (at::vec picks its implementation from them)
SIMD_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}
# with AVX-512, what the CPU has beyond it (Linux's /proc/cpuinfo flag -> compiler flags): bf16
# rounding in one instruction (kernels/cpu_vec.h), AMX tiles for the bf16 attention's matmuls
EXTENSIONS = {"avx512_bf16": ["-mavx512bf16"], "amx_bf16": ["-mamx-tile", "-mamx-bf16", "-DDARL_AMX"]}
HERE = Path(__file__).parent
_BUILD_LOCK = threading.Lock()  # one build per process; torch's loader locks across processes


def sources() -> list[Path]:
    # the attention calls MKL's matmuls, which PyTorch links on x86 (ATen's wrappers are not exported)
    names = ["rms_norm_cpu.cpp", "rotary_cpu.cpp", "gated_activation_cpu.cpp"] + (["shared_prefix_attention_cpu.cpp"] if torch.backends.mkl.is_available() else [])
    return [HERE / name for name in names]


def headers() -> list[Path]:
    return [HERE / "cpu_vec.h"]


def cpu_flags() -> set[str]:
    """This CPU's feature flags from Linux's /proc/cpuinfo (elsewhere none)."""
    try:
        return next((set(line.split(":", 1)[1].split()) for line in open("/proc/cpuinfo") if line.startswith("flags")), set())
    except OSError:
        return set()


def has(op: str) -> bool:
    """Whether `torch.ops.darl_infer_cpu.<op>` is built (`cpu_ops()` first)."""
    return cpu_ops() is not None and hasattr(torch.ops.darl_infer_cpu, op)


def enabled() -> bool:
    return os.environ.get("DARL_INFER_CPU_KERNELS", "1") != "0"


def cpu_ops():
    """`torch.ops.darl_infer_cpu`, built if need be; None where disabled or the build failed."""
    if not enabled():
        return None
    with _BUILD_LOCK:
        return _build()


@functools.cache
def _build():
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the `ninja` package's binary, in a virtual environment not activated
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    level = torch.backends.cpu.get_cpu_capability()
    flags = SIMD_FLAGS.get(level, [])
    if level == "AVX512":
        extensions = sorted(EXTENSIONS.keys() & cpu_flags())
        level = "_".join([level, *extensions])
        flags = flags + [flag for extension in extensions for flag in EXTENSIONS[extension]]
    # one library per SIMD level, torch version and set of sources: a cache shared by machines of
    # different CPUs (a home folder on a network drive), or kept across a torch upgrade, never loads
    # code built for another
    files = sources()
    # no fused multiply-adds where the source has a product and a sum: the kernels round as PyTorch's
    # ops; OpenMP: at::parallel_for runs serially without it (it links the libgomp torch has loaded)
    cflags = ["-O3", "-ffp-contract=off", "-fopenmp", *flags]
    # and one per checkout: torch's loader rebuilds a library whose sources sit elsewhere, under
    # any process of another checkout that has it loaded (two clones sharing the cache, say)
    digest = hashlib.sha1(
        " ".join([torch.__version__, str(HERE.resolve()), *cflags]).encode()
        + b"".join(source.read_bytes() for source in files + headers())
    ).hexdigest()[:10]
    name = f"darl_infer_cpu_{level.lower() if flags else 'portable'}_{digest}"
    build = Path(os.environ.get("DARL_INFER_CACHE", Path.home() / ".cache" / "darl_infer")) / "cpu_kernels" / name
    if not (build / f"{name}.so").exists():
        print(f"darl_infer: building its CPU kernels ({level}, once per machine and checkout: ~15 s) in {build}", file=sys.stderr)
    try:
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=name, sources=[str(source) for source in files], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
            build_directory=str(build), is_python_module=False, verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a header torch no longer ships: PyTorch's path
        warnings.warn(
            f"darl_infer's CPU kernels could not be built ({type(error).__name__}: {error}); the torch backend runs "
            "PyTorch's ops instead (slower, same results). Needs a C++ compiler and ninja (pip install ninja).",
            RuntimeWarning, stacklevel=3,
        )
        return None
    return torch.ops.darl_infer_cpu
