"""Gradient projection as a pure function: A-GEM (Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019)."""

from __future__ import annotations

import torch


def dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over parameters of ⟨a_p, b_p⟩ (a parameter missing from b counts as 0), in float64."""
    terms = [(a[n].double() * b[n].double()).sum() for n in a if n in b]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)


def agem_project(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A-GEM eq. 11: where ⟨g, g_ref⟩ < 0, g̃ = g − (⟨g, g_ref⟩ / ⟨g_ref, g_ref⟩) g_ref, whose dot product with
    g_ref is 0; otherwise g is kept (None). Both are dicts over the same parameters."""
    along, norm = dot(grads, reference), dot(reference, reference)
    if along >= 0 or norm == 0:
        return None
    scale = along / norm
    return {n: (g.double() - scale * reference[n].double()).to(g.dtype) if n in reference else g
            for n, g in grads.items()}
