"""EK-FAC's per-layer pieces: where a layer's parameters sit as a matrix G (out, in'), and its fitted curvature.

Example:
    >>> plan.mat(flat)              # flat (B, P) -> this layer's (B, out, in')
    >>> curv.rotate(G)              # Q_S^T G Q_A: coordinates in the layer's eigenbasis (methods/source.py)
    >>> curv.dense()                # the (out in', out in') matrix, for tests and small layers
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..gradients.handlers import KronHandler, VectorHandler

VECTOR_DENSE = 1024   # a vector block (norm layer) up to this many numbers gets its exact (n x n) curvature block


@dataclass
class LayerPlan:
    """One layer's parameters as a matrix G (out, in') per example, and where they sit in the flat gradient.

    kron (Linear, Conv1d/2d): the weight (out, in) in the handler's layout, the bias as the last column.
    vector (norm layers, grouped convolutions: handlers.VectorHandler; a tied weight, its gradient summed
    over the modules that use it; the parameters no handler covers, generic_curvature.py): the block's n
    numbers as one column (out = n, in' = 1, `spans` the
    (offset, numel) of each parameter); its curvature is then the exact (n x n) second moment of its
    pseudo-gradients, or for n > VECTOR_DENSE its diagonal.
    """

    name: str
    module: nn.Module
    out_dim: int
    in_dim: int          # in_features, or C k k for Conv2d (without the bias column); 1 for a vector block
    has_bias: bool
    w_off: int
    b_off: int | None
    handler: KronHandler | VectorHandler | None
    spans: tuple[tuple[int, int], ...] = ()   # vector: (offset, numel) per parameter, in the block's order
    one_hot: bool = False   # an Embedding (V, D), taken transposed: out = D (its gradients), in' = V (one-hot ids)
    key: str = ""           # unique among the plans: the module's name, or name.weight for one of several parts
    tied: tuple = ()        # a weight several modules use (GPT-2's wte and lm_head): their handlers; a vector block
    generic: bool = False   # the parameters no handler covers (module: the model, handler None); a vector block
    diag_in: bool = False   # A kept as its diagonal (QA the identity): an (in' x in') factor that cannot fit
    diag_out: bool = False  # S kept as its diagonal (QS the identity): a vocabulary's (V x V) factor that cannot fit

    @property
    def cols(self) -> int:
        return self.in_dim + self.has_bias

    @property
    def vector(self) -> bool:
        return bool(self.spans)

    @property
    def diagonal(self) -> bool:
        """S is kept as its diagonal: a vector block too long for an (n x n) factor, or diag_out."""
        return self.diag_out or self.vector and self.out_dim > VECTOR_DENSE

    @property
    def a_diagonal(self) -> bool:
        """A is kept as its diagonal: an Embedding's token counts, or diag_in."""
        return self.one_hot or self.diag_in

    @property
    def factor_bytes(self) -> int:
        """float64 bytes of this layer's curvature: A and S, their eigenvectors and the eigendecomposition's
        workspace (3 of each), and Lambda (out x in')."""
        a = self.cols if self.a_diagonal else self.cols ** 2
        s = self.out_dim if self.diagonal else self.out_dim ** 2
        return 8 * (3 * (a + s) + self.out_dim * self.cols)

    def mat(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (B, P) -> this layer's (B, out, in')."""
        if self.vector:
            return torch.cat([flat[:, o:o + n] for o, n in self.spans], 1).unsqueeze(2)
        if self.one_hot:
            return self.handler.from_params(flat[:, self.w_off:self.w_off + self.out_dim * self.in_dim]).transpose(1, 2)
        W = self.handler.from_params(flat[:, self.w_off:self.w_off + self.out_dim * self.in_dim])
        if self.has_bias:
            W = torch.cat([W, flat[:, self.b_off:self.b_off + self.out_dim].unsqueeze(2)], 2)
        return W

    def put(self, flat: torch.Tensor, M: torch.Tensor) -> None:
        """Write this layer's (B, out, in') into flat (B, P) (the inverse of mat)."""
        if self.vector:
            start = 0
            for o, n in self.spans:
                flat[:, o:o + n] = M[:, start:start + n, 0]
                start += n
            return
        W = M.transpose(1, 2) if self.one_hot else M[:, :, :self.in_dim]
        flat[:, self.w_off:self.w_off + self.out_dim * self.in_dim] = self.handler.to_params(W)
        if self.has_bias:
            flat[:, self.b_off:self.b_off + self.out_dim] = M[:, :, -1]


@dataclass
class LayerCurvature:
    """EK-FAC of one layer: H ~ (Q_S (x) Q_A) diag(lam.flatten()) (Q_S (x) Q_A)^T, float64 as fitted (`to`).

    QA (in', in'), QS (out, out), either None for the identity (a diagonal factor: a long vector block's S, an
    Embedding's token counts A), lam (out, in'); eig_A (in',) and eig_S (out,) give K-FAC (eig_S[i] * eig_A[j]
    in place of lam[i, j]).
    """

    QA: torch.Tensor | None
    QS: torch.Tensor | None
    lam: torch.Tensor
    eig_A: torch.Tensor
    eig_S: torch.Tensor

    def to(self, dtype: torch.dtype) -> "LayerCurvature":
        """This curvature with its tensors in `dtype` (rotations of float32 gradients in float32)."""
        if self.lam.dtype == dtype:
            return self
        return LayerCurvature(*(None if t is None else t.to(dtype)
                                for t in (self.QA, self.QS, self.lam, self.eig_A, self.eig_S)))

    def rotate(self, G: torch.Tensor) -> torch.Tensor:
        """Q_S^T G Q_A for G (..., out, in'): the eigenbasis coordinates."""
        G = G if self.QS is None else self.QS.T @ G
        return G if self.QA is None else G @ self.QA

    def unrotate(self, T: torch.Tensor) -> torch.Tensor:
        """Q_S T Q_A^T: back from the eigenbasis."""
        T = T if self.QS is None else self.QS @ T
        return T if self.QA is None else T @ self.QA.T

    def dense(self, kfac: bool = False) -> torch.Tensor:
        """The (out in', out in') matrix in row-major vec(G) order (for tests and small layers)."""
        def full(Q, eig):
            return torch.eye(len(eig), dtype=eig.dtype, device=eig.device) if Q is None else Q.contiguous()
        Q = torch.kron(full(self.QS, self.eig_S), full(self.QA, self.eig_A))
        d = torch.outer(self.eig_S, self.eig_A) if kfac else self.lam
        return Q @ torch.diag(d.flatten()) @ Q.T
