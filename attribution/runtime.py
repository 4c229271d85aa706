"""Process-level determinism and device choice, shared by training, features and evaluation."""
from __future__ import annotations

import hashlib
import os


def configure_torch(threads: int = 1) -> None:
    """One OpenMP thread per process by default: two threads on this 2-vCPU class of machine ran 10-25x slower."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("experiment asks for device 'cuda' but no CUDA GPU is visible: set device: cpu or auto")
    return device


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from its parts, identical in every process (unlike Python's salted hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def state_dict_digest(state_dict) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict: a data version for model weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype.is_floating_point or t.dtype.is_signed else t.numpy().tobytes())
    return h.hexdigest()
