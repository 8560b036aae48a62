import os

# The suite runs on the eager path; tests that prove compiled == eager call `.compiled` directly.
os.environ.setdefault("SEEDSLOT_COMPILE", "0")

# Without a GPU, @triton.jit kernels run in Triton's interpreter (numpy on CPU tensors): the
# variable is read when a kernel is decorated, so it must be set before anything imports triton
# (importing seedslot or parts of torch does).
import torch  # noqa: E402  (torch itself does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
