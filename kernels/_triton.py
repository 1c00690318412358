"""Triton if it is installed (the "gpu" extra); otherwise a stand-in so the PyTorch references,
which sit in the same files as the kernels, import with torch alone.

`INTERPRETED` records whether the kernels were built for Triton's CPU interpreter: `triton.jit`
reads TRITON_INTERPRET when a kernel is defined (on import), not when it is launched.
"""

from __future__ import annotations

import threading

# Held while a kernel is launched: Triton keeps per-launch state on shared objects, so launches
# from several threads at once would mix it up. On CUDA the autotuner stores the launch's
# arguments on itself (`Autotuner.nargs`) until the launch returns; in the CPU interpreter a launch
# patches triton.language module-wide and sets a global grid index while the kernel runs. On CUDA
# a launch is asynchronous, so the lock covers the launch, not the kernel's run time.
LAUNCH_LOCK = threading.Lock()

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except ImportError:
    HAS_TRITON = INTERPRETED = False

    class _TritonMissing:
        """Lets `@triton.jit`, `@triton.autotune(...)` and `triton.Config(...)` run; a launch raises."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

        def __getitem__(self, grid):
            raise ImportError("the Triton kernels need triton: pip install 'darl-infer[gpu]'")

    triton = tl = _TritonMissing()

__all__ = ["HAS_TRITON", "INTERPRETED", "LAUNCH_LOCK", "triton", "tl"]
