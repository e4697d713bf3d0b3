"""Loads the compiled operator library (`_C.so`), which registers `torch.ops.ggfuse.*`."""
from __future__ import annotations

import pathlib

import torch

_LIB_PATH = pathlib.Path(__file__).with_name("_C.so")


def load() -> None:
    if not _LIB_PATH.exists():
        raise ImportError(
            f"ggfuse's compiled library {_LIB_PATH} is missing: install the package with "
            "`pip install --no-build-isolation .` (scripts/install.sh) rather than importing the "
            "source tree"
        )
    torch.ops.load_library(str(_LIB_PATH))


def has_cuda_kernels() -> bool:
    """True when the library was built with the CUDA kernels (the installed torch had CUDA)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("ggfuse::mat_vec_q8_1", "CUDA")
