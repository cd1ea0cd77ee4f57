"""Tangent samplers (docs/guides/choosing.md, "The options of ForwardGradient", ``tangents``).

Every sampler is split in two steps so that tangents can be generated block by block:

1. *raw* tangents W (k x n): i.i.d. ``normal`` or ``rademacher`` entries, or standard ``basis``
   vectors. Row i of block b depends only on a counter key (small blocks: all their rows on one
   key of the block), so any block can be regenerated alone.
2. an optional k x k *mixing* matrix T computed from the raw Gram matrix G = W W^T alone; the
   tangents are V = T W. Normalization (T = diag(G)^-1/2), orthonormalization (T = L^-1 with
   G = L L^T) and the ``angle`` construction are all of this form.

Because V = T W, the jvps, the Gram matrix and the estimate transform without ever forming V:
d_V = T d_W, G_V = T G T^T, and V^T c = W^T (T^T c).

Structured samplers (docs/guides/structured-tangents.md) store a block's tangents in a
:mod:`~frog.layouts` layout other than dense rows: ``lowrank`` gives every block of 2 or more
dimensions tangents U_i V_i^T / sqrt(r) (k r (m + n) numbers instead of k m n), ``input-span`` draws
their right factors inside the span of the inputs of the layer that uses the weight (set while the
layer runs); vectors keep dense rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .checks import check_int
from .layouts import Dense, Layout, LowRank, gram_of, matrix_shape

KINDS = ("normal", "rademacher", "basis", "orthonormal", "angle", "lowrank", "input-span")
STRUCTURED = ("lowrank", "input-span")  # kinds whose weight blocks are factored (structured tangents)
_MASK64 = (1 << 64) - 1


def check_kind(kind: str, angle: float | None = None) -> None:
    """Raise ValueError for an unknown sampler name or a bad ``angle`` (degrees, in (0, 90])."""
    if kind not in KINDS:
        raise ValueError(f"unknown tangent sampler {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "angle":
        if angle is None:
            raise ValueError("sampler='angle' needs angle= (degrees, in (0, 90])")
        if not 0.0 < float(angle) <= 90.0:
            raise ValueError(f"angle must lie in (0, 90] degrees, got {angle}")
    elif angle is not None:
        raise ValueError(f"angle= is only used with sampler='angle', not {kind!r}")


def check_rank(kind: str, rank: int, shapes: Sequence[torch.Size], names: Sequence[str] | None = None) -> None:
    """Raise ValueError for a rank that ``kind`` cannot use: rank < 1, rank > min(m, n) of a block
    viewed as a matrix (named by ``names``), or a rank other than 1 for an unstructured sampler."""
    check_int("rank", rank, 1)
    if kind not in STRUCTURED:
        if rank != 1:
            raise ValueError(f"rank= is only used with sampler='lowrank' or 'input-span', not {kind!r}")
        return
    for b, shape in enumerate(shapes):
        if len(shape) >= 2 and rank > min(matrix_shape(shape)):
            name = names[b] if names is not None else f"block {b}"
            m, n = matrix_shape(shape)
            raise ValueError(f"rank {rank} exceeds min(m, n) = {min(m, n)} of {name} (a {m} x {n} matrix); "
                             f"use rank <= {min(m, n)}")


def make_layouts(kind: str, shapes: Sequence[torch.Size], rank: int = 1, span: Sequence[int] = ()) -> list[Layout]:
    """The layout of each block: low rank for blocks of 2 or more dimensions under a structured
    ``kind`` (input-span for the block indices in ``span``), dense rows otherwise."""
    return [LowRank(shape, rank, span=b in span) if kind in STRUCTURED and len(shape) >= 2 else Dense(shape)
            for b, shape in enumerate(shapes)]


def stored_size(kind: str, shapes: Sequence[torch.Size], rank: int = 1) -> int:
    """Entries that one tangent of these blocks takes as stored (k r (m + n) / k for factored blocks)."""
    return sum(math.prod(layout.stored) for layout in make_layouts(kind, shapes, rank))


def check_size(kind: str, k: int, n: int) -> None:
    """Raise ValueError when ``kind`` cannot give k tangents in dimension n."""
    check_int("the number of tangents", k, 1)
    if n < 1:
        raise ValueError(f"the dimension must be >= 1, got {n}")
    if kind in ("basis", "orthonormal") and k > n:
        raise ValueError(
            f"tangents={kind!r} gives at most n = {n} tangents, but {k} were asked for; "
            "use fewer tangents or sampler='normal'"
        )
    if kind == "angle" and k > 1 and n < 2:
        raise ValueError("sampler='angle' needs dimension n >= 2 for more than one tangent")


def mean_squared_norm(kind: str, normalize: bool, n: int) -> float:
    """E|v|^2 of one tangent: n for unnormalized normal, rademacher and structured tangents, else 1."""
    return float(n) if kind in ("normal", "rademacher", *STRUCTURED) and not normalize else 1.0


def needs_gram(kind: str, normalize: bool) -> bool:
    """Whether the sampler mixes its raw tangents (its :func:`mixing` depends on their Gram matrix)."""
    return kind in ("orthonormal", "angle") or (normalize and kind != "basis")


def derive_seed(*keys: int) -> int:
    """A 63-bit generator seed from integer keys (splitmix64 chain), e.g. (seed, step, row, block)."""
    state = 0x9E3779B97F4A7C15
    for key in keys:
        state = (state ^ (int(key) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state >> 1


def raw_rows(
    kind: str,
    rows: Sequence[int],
    shape: torch.Size,
    *,
    offset: int = 0,
    batch: Sequence[int] = (),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Raw tangents ``rows`` (global row indices) of a block: shape (*batch, len(rows), *shape).

    ``normal``, ``orthonormal`` and ``angle`` draw N(0, 1) entries, ``rademacher`` +-1 entries,
    ``basis`` puts row i at global coordinate i (the block covers offset .. offset + numel - 1).
    """
    size = (*batch, len(rows), *shape)
    if kind == "basis":
        flat = torch.zeros(len(rows), math.prod(shape), device=device, dtype=dtype)
        for j, i in enumerate(rows):
            if offset <= i < offset + flat.shape[1]:
                flat[j, i - offset] = 1.0
        return flat.reshape(size[len(batch):]).expand(size).clone()
    return fill_random(kind, torch.empty(size, device=device, dtype=dtype), generator)


def fill_random(kind: str, out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill ``out`` in place with +-1 entries (``rademacher``) or N(0, 1) entries (other kinds)."""
    if kind == "rademacher":
        return out.bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
    return out.normal_(generator=generator)


_PARALLEL_FILL_MIN = 1 << 20  # entries from which a tensor is worth filling on several threads
SMALL_BLOCK = 4096  # blocks with fewer entries per tangent draw all k rows from one stream
_WHOLE_BLOCK = 1 << 63  # the row key of a small block's one stream (no row index reaches it)


@functools.cache
def _fill_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="frog-tangents")


def fill_streams(kind: str, out: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """out[j] <- random entries of ``kind`` from a generator seeded with seeds[j], for every j.

    The streams are independent, so a large CPU tensor is filled by torch.get_num_threads()
    threads at once; the numbers do not depend on the number of threads.
    """

    def fill(j: int) -> None:
        generator = torch.Generator(device=out.device)
        generator.manual_seed(int(seeds[j]))
        fill_random(kind, out[j], generator)

    threads = torch.get_num_threads()
    if out.device.type == "cpu" and threads > 1 and len(seeds) > 1 and out.numel() >= _PARALLEL_FILL_MIN:
        list(_fill_pool(threads).map(fill, range(len(seeds))))
    else:
        for j in range(len(seeds)):
            fill(j)
    return out


def mixing(kind: str, normalize: bool, gram: torch.Tensor, angle: float | None = None) -> torch.Tensor | None:
    """The matrix T with tangents V = T W, from the raw Gram matrix G = W W^T (float64, (..., k, k)).

    Returns None when V = W. ``orthonormal``: T = L^-1 with G = L L^T. ``angle``: v_1 = w_1/|w_1|,
    v_i = cos(a) v_1 + sin(a) r_i with r_i the normalized rejection of w_i from v_1.
    ``normalize``: T = diag(G)^-1/2 (tangents of unit length). Leading dimensions are batches.
    """
    k = gram.shape[-1]
    if kind == "orthonormal":
        lower, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()):
            raise ValueError("orthonormal tangents need linearly independent raw tangents (k <= n)")
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device).expand_as(gram)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    if kind == "angle":
        assert angle is not None  # check_kind: the angle sampler has one
        a = math.radians(float(angle))
        norm1 = gram[..., 0, 0].sqrt()
        squared_norms = gram.diagonal(dim1=-2, dim2=-1)[..., 1:]
        along = gram[..., 1:, 0] / gram[..., :1, 0]  # w_i . w_1 / |w_1|^2
        rejection_norm = (squared_norms - along * gram[..., 1:, 0]).clamp_min(0).sqrt()
        if k > 1 and bool((rejection_norm <= 1e-12 * squared_norms.sqrt()).any()):
            raise ValueError("angle tangents: a random tangent was parallel to the first; use n >= 2")
        transform = torch.zeros_like(gram)
        transform[..., 0, 0] = 1.0 / norm1
        idx = torch.arange(1, k, device=gram.device)
        transform[..., idx, 0] = math.cos(a) / norm1.unsqueeze(-1) - math.sin(a) * along / rejection_norm
        transform[..., idx, idx] = math.sin(a) / rejection_norm
        return transform
    if normalize:
        return torch.diag_embed(gram.diagonal(dim1=-2, dim2=-1).rsqrt())
    return None


def sample_tangents(
    num_tangents: int,
    shape: int | Sequence[int],
    kind: str = "normal",
    *,
    angle: float | None = None,
    normalize: bool = False,
    rank: int = 1,
    batch: int | Sequence[int] = (),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sample k tangents of a given shape, returned as a tensor (k, *shape).

    With ``batch`` (e.g. a number of samples S), independent draws of shape (*batch, k, *shape);
    each draw comes from its own stream seeded from ``generator``.

    Example: ``sample_tangents(4, 64, generator=torch.Generator().manual_seed(0))`` is (4, 64)
    with i.i.d. N(0, 1) entries. ``kind`` is one of ``normal``, ``rademacher``, ``basis`` (the
    first k standard basis vectors), ``orthonormal`` (V V^T = I) or ``angle`` (every tangent at
    ``angle`` degrees to the first, all of unit length). ``normalize`` divides each by its norm.
    ``lowrank`` (shape of 2 or more dimensions, viewed as m x n by :func:`matrix_shape`): U_i V_i^T /
    sqrt(rank), formed densely here (ForwardGradient keeps the factors instead).
    """
    check_kind(kind, angle)
    shape = torch.Size((shape,) if isinstance(shape, int) else tuple(shape))
    check_size(kind, num_tangents, math.prod(shape))
    if kind == "input-span":
        raise ValueError("input-span tangents are drawn inside the span of a layer's inputs while the layer "
                         "runs: use ForwardGradient(sampler='input-span').fill_grad(model, loss_fn)")
    if kind == "lowrank" and len(shape) < 2:
        raise ValueError(f"sampler='lowrank' needs a shape of 2 or more dimensions (a matrix), got {tuple(shape)}; "
                         "a vector has no low-rank structure: use sampler='normal'")
    check_rank(kind, rank, [shape])
    layout = make_layouts(kind, [shape], rank)[0]
    if generator is not None and device is None:
        device = generator.device
    batch = (batch,) if isinstance(batch, int) else tuple(batch)
    if batch and kind != "basis":  # one stream per draw, seeded from the generator: filled in parallel
        raw = torch.empty(*batch, num_tangents, *layout.stored, device=device, dtype=dtype)
        draws = raw.reshape(-1, num_tangents, *layout.stored)
        seeds = torch.randint(0, 2**62, (draws.shape[0],), generator=generator, device=device).tolist()
        fill_streams(kind, draws, seeds)
    else:
        raw = raw_rows(kind, range(num_tangents), layout.stored, batch=batch, generator=generator, device=device,
                       dtype=dtype)
    raw = layout.dense(raw)
    if not needs_gram(kind, normalize):
        return raw
    flat = raw.reshape(*batch, num_tangents, -1)
    transform = mixing(kind, normalize, gram_of(flat), angle)
    assert transform is not None  # needs_gram: V is not W
    return (transform.to(raw.dtype) @ flat).reshape(raw.shape)


class TangentPlan:
    """The tangents of one estimator step, generated block by block and never as one k x n matrix.

    Raw tangent row i of block b is drawn from its own generator seeded by
    ``derive_seed(seed, step, i, b)`` (blocks of fewer than SMALL_BLOCK stored entries: all k rows
    from one generator of the block, one call instead of k), so every block (and every row) can be
    regenerated alone, on any process. Each block keeps its rows in a :mod:`~frog.layouts` layout
    (``layouts[b]``): dense rows, or the packed factors of low-rank tangents (structured kinds).
    ``cache=True`` keeps generated blocks (when the k stored rows fit the estimator's tangent
    budget); ``track_gram=True`` adds each whole block to the Gram matrix as it is generated, so
    that :meth:`gram` regenerates only the blocks no engine has asked for. ``buffers`` (block index
    -> tensor, owned by the caller) are reused for whole blocks from one step to the next: writing
    into memory already mapped is much faster than into a fresh allocation.

    Args:
        kind, normalize, angle: the sampler (see :func:`sample_tangents`).
        num_tangents: k.
        shapes: shape of each block (parameter tensor, or block activity), in order.
        seed, step: the counter key of this step.
        rank: r of the low-rank layouts (structured kinds).
        span: indices of the blocks whose right factors an engine draws in the span of a layer's
            inputs (``input-span``; :meth:`set_basis`).
        layouts: the blocks' layouts, instead of those of ``kind`` (:class:`~frog.layouts.PerExample`
            blocks of activity tangents per example, docs/guides/closing-the-gap.md).
    """

    def __init__(
        self,
        kind: str,
        num_tangents: int,
        shapes: Sequence[torch.Size],
        *,
        seed: int,
        step: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        normalize: bool = False,
        angle: float | None = None,
        cache: bool = False,
        track_gram: bool = False,
        buffers: dict[int, torch.Tensor] | None = None,
        rank: int = 1,
        span: Sequence[int] = (),
        layouts: Sequence[Layout] | None = None,
    ) -> None:
        self.kind, self.normalize, self.angle = kind, normalize, angle
        self.num_tangents = num_tangents
        self.shapes = [torch.Size(s) for s in shapes]
        self.offsets = [0]
        for s in self.shapes:
            self.offsets.append(self.offsets[-1] + math.prod(s))
        self.dimension = self.offsets[-1]
        check_kind(kind, angle)
        check_size(kind, num_tangents, self.dimension)
        check_rank(kind, rank, self.shapes)
        self.layouts = make_layouts(kind, self.shapes, rank, span) if layouts is None else list(layouts)
        self.seed, self.step = seed, step
        self.device, self.dtype = device, dtype
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        self._buffers = buffers
        self._gram: torch.Tensor | None = None
        self.track_gram = track_gram or needs_gram(kind, normalize)
        self._block_grams: dict[int, torch.Tensor] = {}
        self._transform: torch.Tensor | None = None

    @property
    def keeps_blocks(self) -> bool:
        """Whether generated blocks are kept for the rest of the step (else generated again)."""
        return self._cache is not None

    def block(self, index: int, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Raw stored tangents of block ``index``: (len(rows), *layouts[index].stored); all k rows by default.

        For dense layouts these are the tangent rows (len(rows), *shape) themselves.
        """
        if self._cache is not None and rows is not None:  # the whole block is wanted later anyway: make it once
            rows = list(rows)
            contiguous = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
            whole = self.block(index)
            return whole[rows[0]: rows[0] + len(rows)] if contiguous and rows else whole[rows]
        if rows is None and self._cache is not None and index in self._cache:
            return self._cache[index]
        wanted = range(self.num_tangents) if rows is None else rows
        stored = self.layouts[index].stored
        if self.kind == "basis":
            out = raw_rows("basis", wanted, stored, offset=self.offsets[index], device=self.device, dtype=self.dtype)
        else:  # each row from its own counter-seeded generator, written in place
            buffer = self._buffer(index) if rows is None else None
            out = torch.empty(len(wanted), *stored, device=self.device, dtype=self.dtype) if buffer is None else buffer
            self._fill_rows(out, wanted, index)
        if rows is None:
            if self._cache is not None:
                self._cache[index] = out
            if self.track_gram and self._gram is None and self._gram_ready(index):
                self._block_grams[index] = self.layouts[index].gram(out)
        return out

    def dense(self, index: int, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Tangents of block ``index`` as dense rows (len(rows), *shape), formed from factors where factored."""
        return self.layouts[index].dense(self.block(index, rows))

    def estimate(self, index: int, coeffs: torch.Tensor) -> torch.Tensor:
        """W_b^T c of block ``index``: coefficients (k,) or (k, B) -> (*shape) or (*shape, B)."""
        return self.layouts[index].estimate(self.block(index), coeffs)

    def inner(self, index: int, grad: torch.Tensor, samples: int, rows: Sequence[int] | None = None) -> torch.Tensor:
        """W_b g of block ``index`` for its gradient g, shaped like the block or (samples, *shape):
        (len(rows), samples)."""
        return self.layouts[index].inner(self.block(index, rows), grad, samples)

    def spanned_dimension(self) -> int:
        """Dimension of the space the tangents are drawn in: n, less where input-span blocks have
        their bases (an m x n weight then spans m d, d = the basis size), as the length correction needs."""
        return sum(layout.spanned for layout in self.layouts)

    def set_basis(self, index: int, basis: torch.Tensor | None) -> None:
        """Input-span block ``index``: right factors V_i = Q rho_i with Q = ``basis`` (n, d), orthonormal
        columns spanning the layer's inputs (None: the whole space). Set before the Gram matrix is formed."""
        if self._gram is not None:
            raise RuntimeError("set_basis after the Gram matrix was formed: the tangents would change under it")
        layout = self.layouts[index]
        assert isinstance(layout, LowRank), f"block {index} is not an input-span block"
        layout.basis = basis

    def give(self, index: int, raw: torch.Tensor) -> None:
        """Use ``raw`` (k, *layouts[index].stored) as block ``index``'s tangents instead of drawing them
        (tangents composed elsewhere: guesses, masked rows; :mod:`frog.guesses`). Needs ``cache=True``."""
        expected = (self.num_tangents, *self.layouts[index].stored)
        if self._cache is None or tuple(raw.shape) != expected:
            raise ValueError(f"block {index} takes given tangents of shape {expected} in a plan that keeps its "
                             f"blocks, got {tuple(raw.shape)}")
        self._cache[index] = raw

    def _gram_ready(self, index: int) -> bool:
        """Whether block ``index``'s Gram contribution can be formed now (an input-span block needs
        its basis, which an engine sets while the layer runs)."""
        layout = self.layouts[index]
        return not (isinstance(layout, LowRank) and layout.span and layout.basis is None)  # factored: LowRank

    def _fill_rows(self, out: torch.Tensor, rows: Sequence[int], index: int) -> None:
        """out[j] = raw row rows[j] of block ``index``: each row from its counter-seeded stream, or,
        for a small block (a bias, a block activity, small factors), all k rows from one stream of the block."""
        if math.prod(self.layouts[index].stored) >= SMALL_BLOCK:
            fill_streams(self.kind, out, [derive_seed(self.seed, self.step, i, index) for i in rows])
            return
        whole = out if len(rows) == self.num_tangents and list(rows) == list(range(self.num_tangents)) \
            else torch.empty(self.num_tangents, *self.layouts[index].stored, device=out.device, dtype=out.dtype)
        fill_streams(self.kind, whole[None], [derive_seed(self.seed, self.step, _WHOLE_BLOCK, index)])
        if whole is not out:
            out.copy_(whole[list(rows)])

    def _buffer(self, index: int) -> torch.Tensor | None:
        """The caller's reusable buffer for the whole block ``index`` (made on first use), if any."""
        if self._buffers is None:
            return None
        size = (self.num_tangents, *self.layouts[index].stored)
        kept = self._buffers.get(index)
        if kept is None or kept.shape != size or kept.dtype != (self.dtype or torch.get_default_dtype()) \
                or (self.device is not None and kept.device != torch.device(self.device)):
            kept = self._buffers[index] = torch.empty(size, device=self.device, dtype=self.dtype)
        return kept

    def _block_gram(self, index: int) -> torch.Tensor:
        if index not in self._block_grams:
            block = self.block(index)  # records its Gram when track_gram is set
            if index not in self._block_grams:
                return self.layouts[index].gram(block)
        return self._block_grams.pop(index)

    def gram(self) -> torch.Tensor:
        """Raw Gram matrix G = sum_b W_b W_b^T, float64 (k, k), or (B, k, k) per example when a block has
        per-example tangents (:class:`~frog.layouts.PerExample`); one pass over the blocks."""
        if self._gram is None:
            total = torch.zeros(self.num_tangents, self.num_tangents, dtype=torch.float64, device=self.device)
            for b in range(len(self.shapes)):
                total = total + self._block_gram(b)  # (k, k) blocks broadcast over per-example ones
            self._gram = total
        return self._gram

    def transform(self) -> torch.Tensor | None:
        """The mixing T (float64, k x k) of this sampler, or None when V = W."""
        if not needs_gram(self.kind, self.normalize):
            return None
        if self._transform is None:
            self._transform = mixing(self.kind, self.normalize, self.gram(), self.angle)
        return self._transform
