"""The CUDA runtime: NVRTC-compiled block-sparse kernels, their cache, launcher and autotuner.

Importing this package is cheap and never touches cuda-python: :func:`register`
only installs a factory with :func:`sparsify.runtime.executors.register_executor`.
The factory imports cuda.core the first time a CUDA tensor reaches a
block-sparse op; when that fails (no driver, no cuda-python, no headers) the
CPU reference executor runs instead, with one warning naming the reason.
"""

from __future__ import annotations

__all__ = ["register", "cuda_executor_factory"]


def cuda_executor_factory(device):
    """``register_executor`` factory: the CUDA executor for ``device`` (raises when it cannot run)."""
    from .executor import CUDAExecutor

    return CUDAExecutor(device)


def register() -> None:
    """Register the CUDA executor for ``"cuda"`` devices.  Never raises."""
    try:
        from ..executors import register_executor

        register_executor("cuda", cuda_executor_factory)
    except Exception:  # registration must never break `import sparsify`
        pass
