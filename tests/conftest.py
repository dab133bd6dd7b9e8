import os
import sys

# make `from tests.tolerances import ...` and `from tolerances import ...` both work
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# Triton kernels are tested on the CPU through the interpreter when no GPU is present.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
