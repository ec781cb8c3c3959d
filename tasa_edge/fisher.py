"""Diagonal Fisher statistics of one weight matrix, in the form the sensitivities need.

The sensitivity of tensor W [r, c] to a quantization error D = Q(W) - W is

    S = 1/2 * sum_ij F_ij * D_ij^2,        F_ij = mean over samples of g_ij^2

(g: the per-sample gradient of the loss). Three forms of F are kept:

* ``exact``: F itself, r x c values (4 or 2 bytes each): two full-size copies (general text and
  task data) double the analysis memory. Kept for checking the compact forms.
* ``factored`` (default): the row sums R_i = sum_j F_ij and column sums C_j = sum_i F_ij, and F is
  read as the rank-one matrix with the same marginals, F_ij ~ R_i * C_j / T (T = sum R = sum C;
  Adafactor's factorisation of a second-moment matrix). r + c float32 values per tensor: the
  statistics of an 8B model take a few MB. The row factor carries the output-gradient scale of each
  output channel, the column factor the input-activation scale of each input column (what
  llama.cpp's importance matrix measures), so the sensitivity keeps both; what it loses is their
  interaction. ``tasa-edge analyze --fisher exact`` and the benchmark's fidelity table measure
  what that costs in plan quality.
* ``block``: F averaged over blocks of 32 consecutive input columns (the smallest quantization
  block of both targets): r * c / 32 values.

Sums over samples are additive in every form, so per-sample statistics are accumulated as the
gradients arrive, and statistics from several processes are summed (distributed analysis).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import TasaError

FORMS = ("factored", "block", "exact")
BLOCK = 32


class FisherAccumulator:
    """Sums of g^2 of one source (general text or task data) for every tensor, in one form."""

    def __init__(self, form: str = "factored", dtype: torch.dtype = torch.float32):
        if form not in FORMS:
            raise TasaError(f"unknown Fisher form {form!r} (known: {', '.join(FORMS)})")
        self.form = form
        self.dtype = dtype if form == "exact" else torch.float32
        self.parts: dict[str, dict[str, torch.Tensor]] = {}     # name -> part -> tensor

    def add(self, name: str, g: torch.Tensor) -> None:
        """Add one sample's gradient ``g`` [r, c] (any float dtype)."""
        self.add_rows(name, 0, g.float().square(), tuple(g.shape))

    def add_sum(self, name: str, g2: torch.Tensor) -> None:
        """Add a sum of squared gradients ``g2`` [r, c] (float32)."""
        self.add_rows(name, 0, g2, tuple(g2.shape))

    def add_rows(self, name: str, r0: int, g2: torch.Tensor, shape: tuple[int, int]) -> None:
        """Add squared gradients ``g2`` of rows ``r0 : r0 + len(g2)`` of a tensor of ``shape``
        (callers stream a gradient in row slices, so no full-size float32 copy is needed)."""
        self.add_rows_at(name, slice(r0, r0 + g2.shape[0]), g2, shape)

    def add_rows_at(self, name: str, rows, g2: torch.Tensor, shape: tuple[int, int]) -> None:
        """Add squared gradients ``g2`` [len(rows), c] of the rows ``rows`` (a slice, or a tensor of
        distinct row indices: the non-zero rows of a sparse embedding gradient)."""
        parts = self.ensure(name, shape, g2.device)
        if self.form == "exact":
            key, v = "full", g2.to(self.dtype)
        elif self.form == "factored":
            parts["cols"] += g2.sum(0)
            key, v = "rows", g2.sum(1)
        else:
            key, v = "blocks", torch.nn.functional.pad(g2, (0, (-shape[1]) % BLOCK)).reshape(g2.shape[0], -1, BLOCK).sum(-1)
        if isinstance(rows, slice):
            parts[key][rows] += v
        else:
            parts[key].index_add_(0, rows, v)

    def ensure(self, name: str, shape: tuple[int, int], device=None) -> dict[str, torch.Tensor]:
        """The sums of tensor ``name`` (zeros until a gradient arrives)."""
        parts = self.parts.get(name)
        if parts is None:
            r, c = shape
            z = dict(device=device)
            parts = self.parts[name] = (
                {"full": torch.zeros(r, c, dtype=self.dtype, **z)} if self.form == "exact" else
                {"rows": torch.zeros(r, **z), "cols": torch.zeros(c, **z)} if self.form == "factored" else
                {"blocks": torch.zeros(r, -(-c // BLOCK), **z)})
        return parts

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.parts.values() for t in p.values())

    def weighted_error(self, name: str, rows, d2: np.ndarray, n_samples: int) -> float:
        """sum_ij F_ij * d2_ij over the rows of ``d2`` (F = sum / n): ``rows`` is the first row
        (``d2`` holds rows ``rows .. rows + len(d2)``) or an array of row indices, one per row of ``d2``."""
        p = self.parts[name]
        sel = slice(rows, rows + d2.shape[0]) if isinstance(rows, (int, np.integer)) else torch.as_tensor(rows)
        scale = 1.0 / max(1, n_samples)
        if self.form == "exact":
            f = p["full"][sel].float().cpu().numpy()
            return scale * float(np.vdot(f, d2))
        if self.form == "factored":
            total = float(p["rows"].double().sum()) or 1.0
            rw = p["rows"][sel].double().cpu().numpy()
            cw = p["cols"].float().cpu().numpy()
            # the row products in float32 (BLAS sgemv: relative error ~1e-7 against float64, and
            # no float64 copy of the slice), summed over rows in float64
            return scale * float(rw @ (np.asarray(d2, dtype=np.float32) @ cw).astype(np.float64)) / total
        blocks = p["blocks"][sel].cpu().numpy().astype(np.float64) / BLOCK
        c = d2.shape[1]
        pad = (-c) % BLOCK
        d2b = np.pad(d2, ((0, 0), (0, pad))).reshape(d2.shape[0], -1, BLOCK).sum(-1, dtype=np.float64)
        return scale * float(np.vdot(blocks, d2b))

    def row_mass(self, name: str) -> np.ndarray | None:
        """Each row's share of the tensor's total Fisher mass (sums to 1; zeros if all are zero; None
        before any gradient of the tensor arrived)."""
        p = self.parts.get(name)
        if p is None:
            return None
        r = (p["full"].float().sum(1) if self.form == "exact" else p["rows"] if self.form == "factored"
             else p["blocks"].sum(1)).double().cpu().numpy()
        t = r.sum()
        return r / t if t > 0 else np.zeros_like(r)

    # ------------------------------------------------------------------ derived forms
    def compact(self, form: str) -> "FisherAccumulator":
        """The same statistics in another (coarser) form: ``exact`` gives every form exactly
        (the compact forms are sums of the exact one), which is how the benchmark compares them."""
        if form == self.form:
            return self
        if self.form != "exact":
            raise TasaError(f"cannot derive {form} Fisher statistics from {self.form} ones")
        out = FisherAccumulator(form)
        for name, p in self.parts.items():
            out.add_sum(name, p["full"].float())
        return out
