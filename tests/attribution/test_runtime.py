"""Process set-up: freed memory is reused instead of being faulted back in on every batch."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A batch loop in a fresh process: 40 MiB (above glibc's largest mmap threshold) and 12 MiB allocated and freed
# per batch, as per-sample gradients do; prints the page faults per batch once the loop is warm.
_LOOP = textwrap.dedent("""
    import resource, sys
    import torch
    sys.path.insert(0, {repo!r})
    from attribution.runtime import configure_torch
    if {configure}:
        configure_torch(1)

    def batch():
        a = torch.ones(10 << 20)
        b = torch.ones(3 << 20)
        del a, b

    for _ in range(20):
        batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        batch()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def _faults_per_batch(configure: bool) -> float:
    code = _LOOP.format(repo=str(REPO), configure=configure)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is the mechanism under test")
def test_configure_torch_stops_page_faults_in_a_batch_loop():
    default = _faults_per_batch(configure=False)
    configured = _faults_per_batch(configure=True)
    assert default > 5_000  # glibc unmaps the 40 MiB block on free and faults its 10,240 pages in again
    assert configured < 50, f"{configured} page faults per batch after configure_torch"
