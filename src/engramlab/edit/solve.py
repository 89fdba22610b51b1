"""The algebra of locate-then-edit methods, once, in float64.

Notation: a layer's value weight ``W`` is ``[d_model, d_mlp]`` and maps keys k (MLP hidden
activations) to values ``W k``. ``C`` is the uncentred key second moment E[k kᵀ]
(:class:`~engramlab.stats.KeyStats`). Every update is returned as low-rank factors ``(u, v)``
with ``ΔW = u @ v.T`` — never as a dense matrix — so a delta costs ``(d_model + d_mlp) · rank``
numbers.

* ROME (Meng et al. 2022, eq. 2): ``ΔW = r (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)`` maps ``k*`` to ``W k* + r``
  exactly while changing other keys as little as possible under C. The published code puts the
  template-averaged k* in C⁻¹k* but the plain prompt's key in the denominator; that mismatch
  makes the update miss its target and sequential ROME collapse (Gupta et al. 2024, "Rebuilding
  ROME"). We use the same k* in both.
* MEMIT (Meng et al. 2023, eq. 14): ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` for keys K ``[d_mlp, n]`` and
  residuals R ``[d_model, n]``; rank n.
* AlphaEdit (Fang et al. 2025, eq. 12, as in their code): with P the projector onto the null
  space of C (eigenvectors whose eigenvalue is below a threshold), and K_p the keys of earlier
  edits, ``ΔWᵀ = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ``. The solution lies in P's range, so
  preserved keys (those C spans) are mapped exactly as before. It is solved in the null space
  itself: with P = U Uᵀ (U orthonormal, ``[d_mlp, m]``), the same ΔW is
  ``R (U (Uᵀ(K Kᵀ + K_p K_pᵀ)U + α I)⁻¹ Uᵀ K)ᵀ``, an m × m positive-definite solve instead of a
  d_mlp × d_mlp general one, with the history kept as ``Uᵀ K_p K_pᵀ U``. The sequential history
  (U, that matrix, edit count) is an explicit :class:`EditState`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_dir
from ..errors import CacheError

FORMAT_VERSION = 2  # 1 kept P and K_pK_pᵀ at full size; still read


def _solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = b`` for a symmetric PSD ``a``; a tiny ridge rescues a singular one."""
    try:
        return torch.linalg.solve(a, b)
    except RuntimeError:
        ridge = 1e-8 * float(torch.diagonal(a).mean().abs().clamp_min(1e-30))
        return torch.linalg.solve(a + ridge * torch.eye(a.shape[0], dtype=a.dtype,
                                                        device=a.device), b)


def rome_update(k: torch.Tensor, r: torch.Tensor, cov: torch.Tensor | None = None, *,
                cov_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-one ``(u, v)`` with ``ΔW k = r`` and minimal change under ``cov`` (identity if None).

    ``k``: ``[d_mlp]`` key; ``r``: ``[d_model]`` wanted change of the layer's output at ``k``;
    ``cov_k``: ``C⁻¹k`` when the caller solved it already (batched over many keys).
    """
    k64 = k.double()
    if cov_k is not None:
        ck = cov_k.double()
    else:
        ck = k64 if cov is None else _solve_psd(cov.double().to(k.device), k64)
    denom = torch.dot(k64, ck)
    if not torch.isfinite(denom) or denom.abs() < 1e-30:
        raise ValueError("key has (near) zero norm under C⁻¹; cannot insert a value for it")
    return r.double()[:, None], (ck / denom)[:, None]


def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's layer update: ``u = R``, ``v = (λC + KKᵀ)⁻¹ K`` (keys ``[d_mlp, n]``,
    residuals ``[d_model, n]``)."""
    k = keys.double()
    # one float64 d_mlp² matrix beside the solve's own (0.3 GB each for GPT-2 XL): a fresh
    # copy of C, scaled and updated in place
    a = cov.to(device=k.device, dtype=torch.float64, copy=True).mul_(lam).addmm_(k, k.T)
    return resid.double(), _solve_psd(a, k)


def cov_factor(cov: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor L of ``cov`` (``C = L Lᵀ``) in float64, for
    :func:`solve_cov`. A singular ``cov`` gets the smallest ridge, from 1e-8 of its mean
    diagonal up, that makes it positive definite."""
    a = cov.double()
    if not bool(torch.isfinite(a).all()):
        raise ValueError("the key statistics hold non-finite values; collect them again")
    factor, info = torch.linalg.cholesky_ex(a)
    scale = float(torch.diagonal(a).mean().abs().clamp_min(1e-30))
    for ridge in (1e-8, 1e-6, 1e-4, 1e-2):
        if int(info) == 0:
            break
        factor, info = torch.linalg.cholesky_ex(
            a + ridge * scale * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
    if int(info) != 0:
        raise ValueError("the key statistics are not positive semi-definite; collect them again")
    return factor


def solve_cov(factor: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``C⁻¹ K`` for keys ``[d_mlp, n]`` in float64 from C's :func:`cov_factor`: two triangular
    solves, so a factor kept between edits makes each solve O(d_mlp² n) instead of O(d_mlp³)."""
    k = keys.double().to(factor.device)
    half = torch.linalg.solve_triangular(factor, k, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


def null_space_basis(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """U₀ ``[d, m]``: the eigenvectors of ``cov`` with eigenvalue below ``threshold``
    (orthonormal, float64). ``cov`` is symmetric PSD, so its eigen- and singular vectors
    coincide (AlphaEdit's code takes an SVD); ``eigh`` is the cheaper, exactly symmetric choice.
    """
    evals, evecs = torch.linalg.eigh(cov.double())
    return evecs[:, evals < threshold]


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ (float64), the paper's projector, from :func:`null_space_basis`."""
    small = null_space_basis(cov, threshold)
    return small @ small.T


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, basis: torch.Tensor,
                     prev_keys_cov: torch.Tensor | None, alpha: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's layer update, ``u = R``, ``v = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K``, solved in the
    null space. With P = U Uᵀ, applying (I − P) to the system gives α (I − P) v = 0, so
    v = U y with ``(Uᵀ(KKᵀ + K_pK_pᵀ)U + αI) y = Uᵀ K``: ``basis`` is U ``[d_mlp, m]`` and
    ``prev_keys_cov`` is Uᵀ K_pK_pᵀ U ``[m, m]`` (what :class:`EditState` keeps)."""
    u0 = basis.double()
    uk = u0.T @ keys.double().to(u0.device)  # [m, n]
    a = uk @ uk.T
    if prev_keys_cov is not None:
        a += prev_keys_cov.to(device=a.device, dtype=torch.float64)
    a.diagonal().add_(alpha)
    factor = torch.linalg.cholesky(a)  # positive definite: α > 0 on a PSD matrix
    return resid.double(), u0 @ torch.cholesky_solve(uk, factor)


@dataclass
class EditState:
    """What a sequential AlphaEdit run carries from one batch to the next.

    ``bases[l]`` is U for layer l, the orthonormal basis of C₀'s null space (fixed, from the
    unedited model's statistics; P = U Uᵀ); ``keys_cov[l]`` accumulates Uᵀ K_p K_pᵀ U of every
    edit made so far. Pass it in, get a new one back; nothing is kept anywhere else, so
    independent runs cannot share history by accident.
    """

    bases: dict[int, torch.Tensor]
    keys_cov: dict[int, torch.Tensor]
    n_edits: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    # DeltaEdit: the sum of every update so far at a layer (dense ``[d_model, d_mlp]``), and
    # the running band of the superimposed noise (see engramlab.edit.deltaedit)
    past: dict[int, torch.Tensor] = field(default_factory=dict)
    band: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_moments(cls, moments: dict[int, torch.Tensor], threshold: float, **meta: Any
                     ) -> EditState:
        """The state before any edit: U per layer from the unedited model's C₀."""
        bases = {layer: null_space_basis(c, threshold).float() for layer, c in moments.items()}
        cov = {layer: torch.zeros(u.shape[1], u.shape[1]) for layer, u in bases.items()}
        null_dims = {str(layer): u.shape[1] for layer, u in bases.items()}
        return cls(bases, cov, 0, {"threshold": threshold, "null_dims": null_dims, **meta})

    def updated(self, new_keys: dict[int, torch.Tensor], n: int) -> EditState:
        """A new state with ``Uᵀ K Kᵀ U`` of ``new_keys[layer]`` (``[d_mlp, n]``) added."""
        cov = {}
        for layer, c in self.keys_cov.items():
            if layer not in new_keys:
                cov[layer] = c
                continue
            uk = self.bases[layer].double().T @ new_keys[layer].double().to(c.device)
            cov[layer] = c + (uk @ uk.T).to(c)
        return EditState(self.bases, cov, self.n_edits + n, dict(self.meta),
                         dict(self.past), dict(self.band))

    def save(self, path: str | os.PathLike[str]) -> Path:
        tensors = {f"U.{layer}": u.contiguous().cpu() for layer, u in self.bases.items()}
        tensors |= {f"KpKp.{layer}": c.contiguous().cpu() for layer, c in self.keys_cov.items()}
        tensors |= {f"past.{layer}": w.contiguous().cpu() for layer, w in self.past.items()}
        doc = {"format": FORMAT_VERSION, "n_edits": self.n_edits, "meta": self.meta,
               "band": self.band}
        path = Path(path)
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(doc, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EditState:
        path = Path(path)
        try:
            doc = json.loads((path / "state.json").read_text())
            tensors = load_file(str(path / "state.safetensors"))
        except Exception as exc:
            raise CacheError(f"edit state {path} is missing or corrupt ({exc})") from exc
        if doc.get("format") not in (1, FORMAT_VERSION):
            raise CacheError(f"edit state {path} has format {doc.get('format')}")
        cov = {int(k[5:]): v for k, v in tensors.items() if k.startswith("KpKp.")}
        if doc["format"] == 1:  # projectors P and full-size K_pK_pᵀ: into the null space
            bases = {int(k[2:]): null_space_basis(-p, -0.5).float()  # eigenvalue-1 vectors
                     for k, p in tensors.items() if k.startswith("P.")}
            cov = {layer: (bases[layer].double().T @ c.double() @ bases[layer].double()).float()
                   for layer, c in cov.items()}
        else:
            bases = {int(k[2:]): v for k, v in tensors.items() if k.startswith("U.")}
        past = {int(k[5:]): v for k, v in tensors.items() if k.startswith("past.")}
        return cls(bases, cov, int(doc["n_edits"]), doc.get("meta", {}), past,
                   {k: float(v) for k, v in doc.get("band", {}).items()})
