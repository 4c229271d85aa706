"""Process-level determinism and device choice, shared by training, features and evaluation."""
from __future__ import annotations

import hashlib
import os
import struct
import threading
from contextlib import contextmanager


def configure_torch(threads: int = 1) -> None:
    """One OpenMP thread per process by default: two threads on this 2-vCPU class of machine ran 10-25x slower.
    Freed memory is kept for reuse (:func:`retain_freed_memory`)."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    retain_freed_memory()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
RETAINED_BYTES = (1 << 31) - 1  # at most ~2 GiB of freed memory is kept at the top of the heap


def retain_freed_memory() -> bool:
    """Have glibc malloc keep freed memory for reuse instead of handing it back to the OS after every batch.

    Per-sample gradients and training steps allocate and free the same tens of MiB to GiB on every batch. By default
    glibc serves blocks above an adaptive threshold (at most 32 MiB) with mmap and unmaps them on free, so the next
    batch page-faults all of that memory in again: 1.5 million faults (5.7 GiB) per batch of 32 on the
    1.1M-parameter benchmark model, 9-38% of its time on a VM (benchmarks/page_faults.py). Here every block comes
    from the heap and up to ``RETAINED_BYTES`` of freed memory stay mapped, so a steady batch loop faults nothing
    once warm. The price is heap fragmentation: peak RSS of that benchmark grows from 3.6 to 4.3 GiB; memory stays
    bounded and independent of the number of batches. Returns False where glibc's mallopt is not available (other C
    libraries, other systems): nothing changes there.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, RETAINED_BYTES))


_THREAD_LOCK = threading.RLock()


@contextmanager
def single_thread():
    """Run the enclosed CPU torch ops on one intra-op thread (restored afterwards). Reduction order then cannot
    depend on the thread count, which makes features bit-identical on any machine; scale-out is across processes."""
    import torch

    with _THREAD_LOCK:
        n = torch.get_num_threads()
        if n != 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if n != 1:
                torch.set_num_threads(n)


def resolve_device(device: str) -> str:
    """The experiment's device ("cpu", "cuda" or "auto"); on CUDA, deterministic kernels are switched on."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("experiment asks for device 'cuda' but no CUDA GPU is visible: set device: cpu or auto")
        deterministic_cuda()
    return device


def deterministic_cuda() -> None:
    """Same inputs, same bits on the GPU too: cuDNN's autotuner may pick a different convolution algorithm per
    process, some of its weight-gradient algorithms and CUDA's index_put_/embedding backward add with atomics, and
    cuBLAS needs a fixed workspace split.  An op with no deterministic CUDA kernel warns (it does not fail)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def stable_seed(domain: str, *ints: int) -> int:
    """A 63-bit seed from a domain tag and integers, identical in every process (unlike Python's salted hash())."""
    h = hashlib.blake2b(domain.encode("utf-8"), digest_size=8)
    for v in ints:
        h.update(struct.pack("<q", int(v)))
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def state_dict_digest(state_dict) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict: a data version for model weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
