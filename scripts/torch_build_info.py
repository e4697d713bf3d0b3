"""Print what CMake needs to build against the installed torch, as KEY=VALUE lines."""
import os

import torch
from torch.utils import cpp_extension

print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print("TORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()))
print(f"TORCH_LIB_DIR={os.path.join(os.path.dirname(torch.__file__), 'lib')}")
