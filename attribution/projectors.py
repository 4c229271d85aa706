"""Seeded random projections P (k x p) of per-sample gradients (DESIGN.md 1.1).

No projector ever materialises a p x k matrix, and the projection of a row depends only on (the row, p, k, seed,
projector parameters): never on the batch it arrives in, the shard, or the thread count.  A sharded feature run
is therefore bit-identical to an unsharded one.  Accumulation is in float64; the result is cast to float32 once.

=====================  ===============================  ===========================  ===================================
name                   time (B rows)                    memory                       accuracy of <Px, Py> (unit x, y)
=====================  ===============================  ===========================  ===================================
gaussian               O(p k) N(0,1) draws per call     one k x b block (~8 MiB),    JL: std of the error ~ sqrt(2/k);
                       (~11 ns each, single thread)     or k p 4 bytes when cached   all n(n-1)/2 pairs within eps when
                       + 2 B p k flops (f64 GEMM)       (k p 4 <= max_cache_bytes)   k >~ 8 ln(n) / eps^2
rademacher             as gaussian; the +-1 draws cost  as gaussian                  as gaussian (sub-Gaussian entries)
                       ~5 ns each (8 signs per random
                       byte)
countsketch (default)  O(B p) (~4 ns per entry): one    hash cache 5 bytes/param,    unbiased; Var = (1 + <x,y>^2 -
                       index-add per chunk and row      + 16 for the chunk plan      2 sum x_j^2 y_j^2) / k <= 2/k, i.e.
                       slice, on ``threads`` threads;   (p <= max_cache_bytes / 21)  Gaussian-like variance, but heavier
                       + O(p) hashing once                                           tails (failure prob ~ 1/(k eps^2))
countsketch_gaussian   O(B p) + O(m k) draws + 2 B m k  hash cache + m x k f32       Gaussian tails at width k on top of
                       flops (m = 4k by default)                                     a countsketch of width m >> k
identity               O(B p) copy                      none                         exact (k must equal p)
=====================  ===============================  ===========================  ===================================

How bit-identity is obtained
----------------------------
* Every random quantity is generated in fixed blocks of the p axis, block j from a ``torch.Generator`` seeded by
  a BLAKE2 hash of (seed, j): the block width depends only on k (recorded in :meth:`Projector.spec`), so P is a
  pure function of (p, k, seed).
* countsketch: ``index_add_`` along the k axis adds a row's entries in ascending parameter order (serially over
  the columns), so a row's sums do not depend on the other rows, on the threads, or on how the columns arrive
  (one (B, p) matrix or per-parameter blocks, cut into chunks anywhere).  With ``threads=n`` the rows are cut
  into n slices projected side by side: the same sums, row by row.
* dense (gaussian / rademacher / the m x k stage): a float64 GEMM of a *whole batch* rounds a row differently
  depending on the batch size (MKL uses other kernels for 1-2 rows; measured) and on the thread count (MKL splits
  the work differently; measured with 2 threads on a 40-row batch).  So rows are multiplied in zero-padded tiles of
  exactly ``TILE_ROWS`` rows, copied into one 64-byte-aligned float64 buffer of fixed shape, so that every row goes
  through an identical GEMM call.  With 8-row tiles the float64 results were already identical for 1 and 2
  threads on the development machine; as a guard for machines with more threads (where MKL may split a tile's
  work differently) the dense stage also runs with ``torch.set_num_threads(1)`` (restored afterwards, under a
  lock).  Generating P is single-threaded anyway (cost comparable to the GEMM: p=7e5, k=1024, B=32 took ~8 s
  generation + ~12 s GEMM on one core), so the guard costs at most the GEMM's parallel speed-up; run shards in
  parallel processes instead.  The tests check row-alone vs in-batch (float64 accumulators included) and
  1 vs 2 threads with ``torch.equal``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .runtime import single_thread, stable_seed

__all__ = [
    "Projector",
    "GaussianProjector",
    "RademacherProjector",
    "CountSketchProjector",
    "CountSketchGaussianProjector",
    "IdentityProjector",
    "PROJECTORS",
    "DEFAULT_PROJECTOR",
    "make_projector",
    "TILE_ROWS",
]

TILE_ROWS = 8  # rows per dense GEMM call (fixed, so that a row's arithmetic never depends on the batch)
DENSE_BLOCK_ELEMENTS = 1 << 20  # k x b elements per generated dense block (8 MiB in float64)
HASH_BLOCK = 1 << 16  # parameters per countsketch hash block
CHUNK_ELEMENTS = 1 << 17  # entries per index_add_ call: a 1 MiB float64 source (speed only, as the next)
OUT_SLICE_BYTES = 1 << 20  # the most output bytes one index_add_ writes: rows per slice = this / (8 k)
DEFAULT_MAX_CACHE_BYTES = 256 << 20


def _cpu_blocks(G: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [b.detach().cpu() for b in ([G] if isinstance(G, Tensor) else G)]


def _generator(*key: int, domain: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(stable_seed(domain, *key))
    return g


class Projector(ABC):
    """Base: ``project(G (B, p)) -> (B, k) float32`` with a seeded P (k x p); ``spec()`` identifies P."""

    name: str = "base"

    def __init__(self, p: int, k: int, seed: int = 0, threads: int = 1) -> None:
        p, k = int(p), int(k)
        if p < 1 or k < 1:
            raise ValueError(f"projector needs p >= 1 and k >= 1, got p={p}, k={k}")
        if int(threads) < 1:
            raise ValueError(f"projector threads must be >= 1, got {threads}")
        self.p, self.k, self.seed = p, k, int(seed)
        # row slices projected side by side (countsketch stages); never changes the result, so not in spec()
        self.threads = int(threads)

    def spec(self) -> dict:
        """Everything that determines P (store it with the features; compare it on reload)."""
        return {"name": self.name, "p": self.p, "k": self.k, "seed": self.seed}

    def _check(self, blocks: list[Tensor]) -> None:
        if (not blocks or any(b.ndim != 2 for b in blocks) or len({b.shape[0] for b in blocks}) != 1
                or sum(b.shape[1] for b in blocks) != self.p):
            got = ", ".join(str(tuple(b.shape)) for b in blocks)
            raise ValueError(f"{self.name} projector expects (B, {self.p}) input (or column blocks (B, p_i) that "
                             f"add up to it), got {got or 'nothing'}")

    def project(self, G: Tensor | Sequence[Tensor]) -> Tensor:
        """(B, p) -> (B, k) float32.  Row i of the result depends only on G[i] (bit for bit).  G may also be the
        same matrix as its column blocks in order (:meth:`GradientEngine.blocks`): the same result, and
        countsketch reads them without joining them first."""
        blocks = _cpu_blocks(G)
        self._check(blocks)
        return self._project_blocks64(blocks).to(torch.float32)

    def _project_blocks64(self, blocks: list[Tensor]) -> Tensor:
        """Column blocks -> (B, k) float64: joined into one matrix, unless a projector reads blocks itself."""
        return self._project64(blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1))

    @abstractmethod
    def _project64(self, G: Tensor) -> Tensor:
        """(B, p) (float32 or float64) -> (B, k) float64."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.spec().items() if k != 'name')})"


class IdentityProjector(Projector):
    """No projection (k must equal p): the features are the gradients themselves (TracIn/ReTrac as published)."""

    name = "identity"

    def __init__(self, p: int, k: int | None = None, seed: int = 0, threads: int = 1) -> None:
        k = p if k is None else k
        if int(k) != int(p):
            raise ValueError(f"identity projector needs k == p, got k={k}, p={p}")
        super().__init__(p, k, seed, threads)

    def project(self, G: Tensor | Sequence[Tensor]) -> Tensor:
        blocks = _cpu_blocks(G)
        self._check(blocks)
        return torch.cat(blocks, dim=1).to(torch.float32, copy=True)

    def _project64(self, G: Tensor) -> Tensor:
        return G.to(torch.float64)


class _DenseProjector(Projector):
    """P generated in column blocks of width ``block_size`` (a function of k only), block j seeded by (seed, j)."""

    def __init__(
        self,
        p: int,
        k: int,
        seed: int = 0,
        block_size: int | None = None,
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        threads: int = 1,
    ) -> None:
        super().__init__(p, k, seed, threads)
        if block_size is None:
            block_size = max(64, (DENSE_BLOCK_ELEMENTS // self.k) // 64 * 64)
        self.block_size = int(block_size)
        self.num_blocks = math.ceil(self.p / self.block_size)
        self._cache: dict[int, Tensor] | None = {} if 4 * self.k * self.p <= max_cache_bytes else None

    def spec(self) -> dict:
        return {**super().spec(), "block_size": self.block_size}

    @abstractmethod
    def _generate(self, gen: torch.Generator, rows: int, cols: int) -> Tensor:
        """A (rows, cols) float32 block of P's entries (unscaled)."""

    def _block(self, j: int) -> Tensor:
        """Block j of P, (k, width) float32 unscaled."""
        if self._cache is not None and j in self._cache:
            return self._cache[j]
        lo = j * self.block_size
        width = min(self.block_size, self.p - lo)
        blk = self._generate(_generator(self.seed, j, domain=f"projector/{self.name}"), self.k, width)
        if self._cache is not None:
            self._cache[j] = blk
        return blk

    def block(self, j: int) -> Tensor:
        """Columns [j*block_size, (j+1)*block_size) of P, scaled (for inspection and tests)."""
        return self._block(j).to(torch.float64) / math.sqrt(self.k)

    def _project64(self, G: Tensor) -> Tensor:
        B = G.shape[0]
        out = torch.zeros(B, self.k, dtype=torch.float64)
        if B == 0:
            return out
        bs = self.block_size
        with single_thread():
            tile = torch.empty(TILE_ROWS, bs, dtype=torch.float64)
            for j in range(self.num_blocks):
                lo = j * bs
                width = min(bs, self.p - lo)
                # zero-padded to the full block width so every tile has the same shape and row alignment
                pt = torch.zeros(bs, self.k, dtype=torch.float64)
                pt[:width] = self._block(j).T
                for r in range(0, B, TILE_ROWS):
                    nr = min(TILE_ROWS, B - r)
                    tile.zero_()
                    tile[:nr, :width] = G[r : r + nr, lo : lo + width]
                    out[r : r + nr] += torch.mm(tile, pt)[:nr]
        return out.mul_(1.0 / math.sqrt(self.k))


class GaussianProjector(_DenseProjector):
    """P_ij ~ N(0, 1/k) (the TRAK / D-TRAK reference projection)."""

    name = "gaussian"

    def _generate(self, gen: torch.Generator, rows: int, cols: int) -> Tensor:
        return torch.randn(rows, cols, generator=gen, dtype=torch.float32)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


class RademacherProjector(_DenseProjector):
    """P_ij = +-1/sqrt(k) with equal probability (8 signs per random byte)."""

    name = "rademacher"

    def _generate(self, gen: torch.Generator, rows: int, cols: int) -> Tensor:
        n = rows * cols
        raw = torch.randint(0, 256, ((n + 7) // 8,), generator=gen, dtype=torch.uint8)
        bits = ((raw.unsqueeze(1) >> _BIT_SHIFTS) & 1).reshape(-1)[:n]
        return (bits.to(torch.float32) * 2.0 - 1.0).reshape(rows, cols)


class CountSketchProjector(Projector):
    """Parameter j goes to bucket h(j) in [0, k) with sign s(j): (PG)_b = sum_{j: h(j)=b} s(j) G_j.  No scaling
    is needed: E <Px, Py> = <x, y>.  Hashes are drawn in blocks of ``HASH_BLOCK`` parameters seeded by (seed, block)."""

    name = "countsketch"

    def __init__(self, p: int, k: int, seed: int = 0, max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
                 threads: int = 1) -> None:
        super().__init__(p, k, seed, threads)
        self.num_blocks = math.ceil(self.p / HASH_BLOCK)
        self._cache: dict[int, tuple[Tensor, Tensor]] | None = {} if 5 * self.p <= max_cache_bytes else None
        # the hash of every column chunk of one block layout, ready for index_add_ (16 bytes/param)
        self._plan: tuple[tuple, list] | None = None
        self._cache_plan = 21 * self.p <= max_cache_bytes

    def spec(self) -> dict:
        return {**super().spec(), "hash_block": HASH_BLOCK}

    def _hash(self, j: int) -> tuple[Tensor, Tensor]:
        """(buckets int32, signs int8) for hash block j."""
        if self._cache is not None and j in self._cache:
            return self._cache[j]
        width = min(HASH_BLOCK, self.p - j * HASH_BLOCK)
        gen = _generator(self.seed, j, domain="projector/countsketch")
        buckets = torch.randint(0, self.k, (width,), generator=gen, dtype=torch.int64).to(torch.int32)
        signs = (torch.randint(0, 2, (width,), generator=gen, dtype=torch.int8) * 2 - 1).to(torch.int8)
        if self._cache is not None:
            self._cache[j] = (buckets, signs)
        return buckets, signs

    def buckets_and_signs(self) -> tuple[Tensor, Tensor]:
        """The full hash (p,) int64 buckets and (p,) float64 signs (for inspection and tests)."""
        hs = [self._hash(j) for j in range(self.num_blocks)]
        return torch.cat([h.long() for h, _ in hs]), torch.cat([s.double() for _, s in hs])

    def _project64(self, G: Tensor) -> Tensor:
        return self._project_blocks64([G])

    def _hash_range(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """(buckets int64, signs float64) of columns [lo, hi)."""
        parts = []
        while lo < hi:
            j, r = divmod(lo, HASH_BLOCK)
            buckets, signs = self._hash(j)
            n = min(hi - lo, buckets.shape[0] - r)
            parts.append((buckets[r : r + n].to(torch.int64), signs[r : r + n].to(torch.float64)))
            lo += n
        if len(parts) == 1:
            return parts[0]
        return torch.cat([b for b, _ in parts]), torch.cat([sg for _, sg in parts])

    def _chunks(self, widths: tuple[int, ...], columns: int) -> Iterable[tuple[list[tuple[int, int, int]], Tensor,
                                                                              Tensor]]:
        """Column chunks of at most ``columns`` columns over blocks of these widths: (pieces (block, start,
        stop), buckets, signs).  Small blocks (biases, norms) share a chunk, so each costs no call of its own.
        Kept for the last layout when the cache allows, else generated chunk by chunk (bounded memory)."""
        key = (widths, columns)
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        if not self._cache_plan:
            return self._plan_chunks(widths, columns)
        self._plan = (key, list(self._plan_chunks(widths, columns)))
        return self._plan[1]

    def _plan_chunks(self, widths: tuple[int, ...], columns: int) -> Iterator[tuple[list[tuple[int, int, int]],
                                                                                    Tensor, Tensor]]:
        pieces, lo, size = [], 0, 0
        for i, w in enumerate(widths):
            c = 0
            while c < w:
                n = min(w - c, columns - size)
                pieces.append((i, c, c + n))
                c, size = c + n, size + n
                if size == columns:
                    yield (pieces, *self._hash_range(lo, lo + size))
                    pieces, lo, size = [], lo + size, 0
        if size:
            yield (pieces, *self._hash_range(lo, lo + size))

    def _project_blocks64(self, blocks: list[Tensor]) -> Tensor:
        B = blocks[0].shape[0]
        out = torch.zeros(B, self.k, dtype=torch.float64)
        if B == 0:
            return out
        # Rows go in slices whose part of ``out`` (written at random by index_add_) stays in the core's cache: at
        # k=32768, slices of 4 rows ran 1.8-2.2x faster than 64 rows at once (benchmarks/countsketch_slices.py).
        # Each thread takes a contiguous run of slices.  A row's sums depend on neither.
        rows = max(1, min(OUT_SLICE_BYTES // (8 * self.k), -(-B // self.threads)))
        columns = max(1, CHUNK_ELEMENTS // rows)
        widths = tuple(b.shape[1] for b in blocks)
        plan = self._chunks(widths, columns)
        workers = min(self.threads, -(-B // rows))
        if workers == 1:
            self._sketch_rows(blocks, out, plan, columns, rows)
            return out
        cuts = [-(-B // rows) * i // workers * rows for i in range(workers)] + [B]

        def sketch(i: int) -> None:
            part = slice(cuts[i], cuts[i + 1])
            chunks = plan if isinstance(plan, list) else self._plan_chunks(widths, columns)  # one generator each
            self._sketch_rows([b[part] for b in blocks], out[part], chunks, columns, rows)

        with ThreadPoolExecutor(workers, thread_name_prefix="countsketch") as pool:
            list(pool.map(sketch, range(workers)))
        return out

    @staticmethod
    def _sketch_rows(blocks: list[Tensor], out: Tensor, chunks: Iterable, columns: int, rows: int) -> None:
        """Add the sketch of these rows to ``out``, chunk by chunk, ``rows`` rows at a time.  A chunk's float64
        source stays in cache; any chunking gives the same bits, because index_add_ adds the chunk's columns to
        each row serially in ascending order (measured 10-15% faster than scatter_add_)."""
        B = out.shape[0]
        src = torch.empty(min(rows, B), columns, dtype=torch.float64)
        for pieces, buckets, signs in chunks:
            for r in range(0, B, rows):
                n = min(rows, B - r)
                c = 0
                for i, a, z in pieces:
                    src[:n, c : c + z - a] = blocks[i][r : r + n, a:z]
                    c += z - a
                out[r : r + n].index_add_(1, buckets, src[:n, :c].mul_(signs))


class CountSketchGaussianProjector(Projector):
    """CountSketch to an intermediate width m (default 4k), then a dense seeded m x k Gaussian (N(0, 1/k))."""

    name = "countsketch_gaussian"

    def __init__(
        self, p: int, k: int, seed: int = 0, m: int | None = None, max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        threads: int = 1,
    ) -> None:
        super().__init__(p, k, seed, threads)
        self.m = int(m) if m is not None else 4 * self.k
        sub = stable_seed("projector/countsketch_gaussian", self.seed)
        self.sketch = CountSketchProjector(p, self.m, seed=sub, max_cache_bytes=max_cache_bytes, threads=threads)
        # the m x k stage is small: always cache it
        self.dense = GaussianProjector(self.m, self.k, seed=sub, max_cache_bytes=max(max_cache_bytes, 4 * self.m * self.k))

    def spec(self) -> dict:
        return {**super().spec(), "m": self.m, "hash_block": HASH_BLOCK, "block_size": self.dense.block_size}

    def _project64(self, G: Tensor) -> Tensor:
        return self._project_blocks64([G])

    def _project_blocks64(self, blocks: list[Tensor]) -> Tensor:
        return self.dense._project64(self.sketch._project_blocks64(blocks))


PROJECTORS: dict[str, type[Projector]] = {
    "gaussian": GaussianProjector,
    "rademacher": RademacherProjector,
    "countsketch": CountSketchProjector,
    "countsketch_gaussian": CountSketchGaussianProjector,
    "identity": IdentityProjector,
}
DEFAULT_PROJECTOR = "countsketch"


def make_projector(name: str, p: int, k: int, seed: int = 0, **kwargs) -> Projector:
    """The projector called ``name`` (see :data:`PROJECTORS`); ValueError naming the known ones otherwise."""
    try:
        cls = PROJECTORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown projector {name!r}; known: {', '.join(PROJECTORS)}") from None
    return cls(p, k, seed, **kwargs)
