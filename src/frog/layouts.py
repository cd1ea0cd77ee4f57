"""Block layouts: how the k tangents of one block are stored, and what follows from them
(docs/guides/structured-tangents.md).

A :class:`~frog.tangents.TangentPlan` cuts the n coordinates into blocks (parameter tensors or
block activities). Block b stores its k raw tangents W_b in a layout, and three things follow from
every layout, whatever its kind; they are all that aggregation and engines need:

- its Gram contribution G_b = W_b W_b^T (k x k, float64), summed over blocks to G;
- its estimate W_b^T c from the coefficients c (k,);
- the jvps W_b g_b of a known gradient g_b (the ``sim`` engine).

:class:`Dense`: rows (k, *shape), i.i.d. entries. :class:`LowRank`: a weight viewed as an m x n
matrix (:func:`matrix_shape`) gets tangents W_i = U_i V_i^T / sqrt(r) with U_i (m x r) and
V_i (n x r) i.i.d. N(0, 1), stored packed as (k, r, m + n) = [U_i^T | V_i^T]: k r (m + n) numbers
instead of k m n, with the same second moments as dense N(0, 1) tangents. With a ``basis``
Q (n x d, orthonormal columns) the right factor is V_i = Q rho_i, rho_i the first d entries of the
stored right half: input-span tangents, whose right factors lie in the span of a layer's inputs.
"""

from __future__ import annotations

import math

import torch


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(m, n) of a tensor of 2 or more dimensions viewed as a matrix: its first dimension x the rest.

    Linear (out, in); Conv (out, in * kh * kw); Embedding (num, dim).
    """
    return int(shape[0]), math.prod(shape[1:])


def combine(tangents: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """V^T c: tangents (k, *shape) and coefficients (k,) or (k, B) -> (*shape) or (*shape, B)."""
    return torch.tensordot(tangents, coefficients.to(tangents.dtype), dims=([0], [0]))


def gram_of(flat: torch.Tensor) -> torch.Tensor:
    """G = W W^T of rows W (..., k, m), returned in float64: shape (..., k, k).

    The product runs in float64 unless the block is tall (m >= 64 k): random tall blocks are well
    conditioned, so their Gram matrix loses nothing that matters in the tangents' own precision.
    """
    k, m = flat.shape[-2], flat.shape[-1]
    if flat.dtype != torch.float64 and m >= 64 * k:
        return (flat @ flat.mT).to(torch.float64)
    wide = flat.to(torch.float64)
    return wide @ wide.mT


class Dense:
    """Dense tangent rows: stored (k, *shape)."""

    factored = False

    def __init__(self, shape: torch.Size) -> None:
        self.shape = self.stored = torch.Size(shape)

    @property
    def spanned(self) -> int:
        """Dimension of the space the tangents are drawn in: every entry."""
        return self.shape.numel()

    def dense(self, raw: torch.Tensor) -> torch.Tensor:
        """The tangents themselves, (k, *shape)."""
        return raw

    def gram(self, raw: torch.Tensor) -> torch.Tensor:
        """W W^T, float64 (k, k)."""
        return gram_of(raw.reshape(raw.shape[0], -1))

    def squared_norms(self, raw: torch.Tensor) -> torch.Tensor:
        """|w_i|^2 of each row, float64 (k,)."""
        return raw.reshape(raw.shape[0], -1).double().square().sum(-1)

    def estimate(self, raw: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """W^T c: coefficients (k,) or (k, B) -> (*shape) or (*shape, B)."""
        return combine(raw, coeffs)

    def inner(self, raw: torch.Tensor, grad: torch.Tensor, samples: int) -> torch.Tensor:
        """W g for a gradient of the block's shape (samples = 1) or per sample (samples, *shape):
        (k, samples)."""
        per_sample = grad.reshape(samples, -1).T  # (numel, samples)
        return raw.reshape(raw.shape[0], -1).to(grad.dtype) @ per_sample


class LowRank:
    """Tangents U_i V_i^T / sqrt(r) of a block viewed as an m x n matrix, stored (k, r, m + n).

    ``span``: the right factors are to be drawn in the span of the inputs of the layer that uses
    the block (input-span tangents); an engine sets ``basis`` (n, d) while the layer runs. Until
    then (and for ``span=False``) V_i is the stored right half itself, as plain low rank.
    """

    factored = True

    def __init__(self, shape: torch.Size, rank: int, span: bool = False) -> None:
        self.shape = torch.Size(shape)
        self.m, self.n = matrix_shape(self.shape)
        self.rank = rank
        self.stored = torch.Size((rank, self.m + self.n))
        self.span = span
        self.basis: torch.Tensor | None = None

    @property
    def spanned(self) -> int:
        """Dimension of the space the tangents are drawn in (their E|v|^2): m n, or m d in a basis (n, d)."""
        return self.m * (self.n if self.basis is None else self.basis.shape[1])

    def left(self, raw: torch.Tensor) -> torch.Tensor:
        """U_i^T / sqrt(r): (..., r, m)."""
        return raw[..., : self.m] / math.sqrt(self.rank)

    def coordinates(self, raw: torch.Tensor) -> torch.Tensor:
        """The right factors in the basis (rho_i, (..., r, d)), or V_i^T itself (..., r, n) without one."""
        right = raw[..., self.m:]
        return right if self.basis is None else right[..., : self.basis.shape[1]]

    def right(self, raw: torch.Tensor) -> torch.Tensor:
        """V_i^T: (..., r, n)."""
        coords = self.coordinates(raw)
        return coords if self.basis is None else coords @ self.basis.T.to(coords.dtype)

    def dense(self, raw: torch.Tensor) -> torch.Tensor:
        """The tangents U_i V_i^T / sqrt(r) formed densely, (..., *shape): for modules frog does not know."""
        product = self.left(raw).mT @ self.right(raw)  # (..., m, n)
        return product.reshape(*raw.shape[:-2], *self.shape)

    def gram(self, raw: torch.Tensor) -> torch.Tensor:
        """<W_i, W_j>_F = trace((U_i^T U_j)(V_j^T V_i)) / r, float64 (k, k), from the factors alone.

        With a basis, V_i^T V_j = rho_i^T rho_j (Q has orthonormal columns).
        """
        left = self.left(raw).double()
        coords = self.coordinates(raw).double()
        if self.rank == 1:
            return (left[:, 0] @ left[:, 0].T) * (coords[:, 0] @ coords[:, 0].T)
        left_products = torch.einsum("iam,jbm->ijab", left, left)
        right_products = torch.einsum("iad,jbd->ijab", coords, coords)
        return (left_products * right_products).sum((-2, -1))

    def squared_norms(self, raw: torch.Tensor) -> torch.Tensor:
        """|U_i V_i^T|_F^2 / r of each row, float64 (k,): the diagonal of :meth:`gram`."""
        return self.gram(raw).diagonal()

    def estimate(self, raw: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """sum_i c_i U_i V_i^T / sqrt(r) = (m x kr)(kr x d) [then x Q^T]: coefficients (k,) -> (*shape)."""
        if coeffs.dim() != 1:
            raise ValueError("low-rank tangents give one estimate per weight: coefficients must be (k,)")
        k = raw.shape[0]
        left = (self.left(raw) * coeffs.to(raw.dtype)[:, None, None]).reshape(k * self.rank, self.m)
        product = left.T @ self.coordinates(raw).reshape(k * self.rank, -1)  # (m, d) or (m, n)
        if self.basis is not None:
            product = product @ self.basis.T.to(product.dtype)
        return product.reshape(self.shape)

    def inner(self, raw: torch.Tensor, grad: torch.Tensor, samples: int) -> torch.Tensor:
        """<W_i, g> = sum over r of u_i^T g v_i / sqrt(r) for a gradient g of the block's shape: (k, 1)."""
        if samples != 1:
            raise ValueError("low-rank tangents perturb weights: the gradient must be one per block, not per sample")
        matrix = grad.reshape(self.m, self.n)
        if self.basis is not None:
            matrix = matrix @ self.basis.to(matrix.dtype)  # (m, d): g Q, so that g v_i = (g Q) rho_i
        left = self.left(raw).to(grad.dtype)
        projected = left @ matrix  # (k, r, d): u_i^T g (Q)
        return (projected * self.coordinates(raw).to(grad.dtype)).sum((-2, -1)).unsqueeze(-1)


class PerExample:
    """Independent tangent rows per example of a block activity (docs/guides/closing-the-gap.md): stored
    (k, B, *shape).

    Row i holds one tangent per example, v_{i,1..B}; example j sees only its own v_{i,j}. So the
    Gram matrix is per example, G_j = sum_b V_{b,j} V_{b,j}^T (B, k, k), and so are the coefficients
    (k, B) and the estimate sum_i c_{i,j} v_{i,j}. One tangent shared by the batch is a Dense block.
    """

    factored = False

    def __init__(self, shape: torch.Size, batch: int) -> None:
        self.shape = torch.Size(shape)
        self.batch = batch
        self.stored = torch.Size((batch, *self.shape))

    @property
    def spanned(self) -> int:
        """Dimension of one example's space, the block's features."""
        return self.shape.numel()

    def dense(self, raw: torch.Tensor) -> torch.Tensor:
        """The tangents themselves, (k, B, *shape)."""
        return raw

    def _rows(self, raw: torch.Tensor) -> torch.Tensor:
        """(k, B, features)."""
        return raw.reshape(raw.shape[0], self.batch, -1)

    def gram(self, raw: torch.Tensor) -> torch.Tensor:
        """G_j = V_j V_j^T per example j, float64 (B, k, k)."""
        return gram_of(self._rows(raw).transpose(0, 1))

    def squared_norms(self, raw: torch.Tensor) -> torch.Tensor:
        """|w_i|^2 of each whole row (all examples), float64 (k,)."""
        return self._rows(raw).double().square().sum((1, 2))

    def estimate(self, raw: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """sum_i c_{i,j} v_{i,j} per example j: coefficients (k, B) -> (*shape, B)."""
        if coeffs.shape != (raw.shape[0], self.batch):
            raise ValueError(f"per-example tangents need coefficients (k, B) = ({raw.shape[0]}, {self.batch}), "
                             f"got {tuple(coeffs.shape)}")
        combined = (self._rows(raw) * coeffs.to(raw.dtype).unsqueeze(-1)).sum(0)  # (B, features)
        return combined.T.reshape(*self.shape, self.batch)

    def inner(self, raw: torch.Tensor, grad: torch.Tensor, samples: int) -> torch.Tensor:
        """<v_{i,j}, g_j> for per-example gradients g (B, *shape): (k, B)."""
        if samples != self.batch:
            raise ValueError(f"per-example tangents of a batch of {self.batch} need {self.batch} per-sample "
                             f"gradients, got {samples}")
        return (self._rows(raw).to(grad.dtype) * grad.reshape(1, samples, -1)).sum(-1)


Layout = Dense | LowRank | PerExample
