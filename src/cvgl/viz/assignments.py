"""What a trained SALAD head keeps and where it sends each patch: the GenGeo paper's Fig. 4 and 7.

For a query/reference pair the figure shows, per view, the image, the DINOv2 patch-token norm
(the backbone's own saliency), the dustbin selection map ``1 - w`` (what the head keeps), and
below both, the two views' average cluster-assignment distributions over a region of patches
(Fig. 7: corresponding regions should put their mass on the same clusters). The region matters:
over the *whole* image SALAD's marginals give every cluster about one token's worth of mass, so
the whole-image distribution is close to uniform by construction; the default region is the
central half of each view (where a north-up drone photo and its tile show the same ground). :func:`assignment_summary`
gives the same numbers without drawing, for tests and tables.

``cvgl explain MODEL QUERY REFERENCE --out fig.png`` draws it from the command line.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cvgl.io import write_bytes_atomic
from cvgl.models.view_heads import eval_mode


@dataclass
class ViewAssignment:
    token_norm: np.ndarray  # [h, w] L2 norm of each last-block patch token
    keep: np.ndarray  # [h, w] 1 - dustbin weight (all ones without a dustbin)
    clusters: np.ndarray  # [M] mean share of each cluster over the patches (sums to 1)


Region = tuple[float, float, float, float]  # top, bottom, left, right as fractions of the token grid
CENTRE: Region = (0.25, 0.75, 0.25, 0.75)


def _span(low: float, high: float, n: int) -> slice:
    """Cells ``[low, high)`` of ``n`` as fractions, at least one cell."""
    start = int(round(low * n))
    return slice(start, max(int(round(high * n)), start + 1))


def _view(model, image: torch.Tensor, view: str, region: Region) -> ViewAssignment:
    from cvgl.models.salad import Salad

    head = model.heads.head(view)
    if not isinstance(head, Salad):
        raise ValueError(f"the {view} head is {type(head).__name__}; dustbin and cluster maps need a SALAD head")
    tokens = model.tokens(image[None])
    assigned = head.assignments(tokens)
    keep = 1.0 - assigned.dustbin_weight[0]
    h, w = keep.shape
    top, bottom, left, right = region
    rows, cols = _span(top, bottom, h), _span(left, right, w)
    probs = assigned.cluster_probs[0][:, rows, cols].flatten(1)  # [M, tokens in the region]
    clusters = (probs / probs.sum(0, keepdim=True).clamp_min(1e-12)).mean(1)
    return ViewAssignment(
        token_norm=tokens.patches[0].norm(dim=0).float().numpy(),
        keep=keep.float().numpy(),
        clusters=clusters.float().numpy(),
    )


@torch.inference_mode()
def assignment_summary(model, query: torch.Tensor, reference: torch.Tensor, region: Region = CENTRE) -> dict:
    """Per-view maps and cluster distributions, and how alike the two distributions are.

    ``query``/``reference``: float ``[3, H, W]`` in [0, 1] at the model's input sizes.
    ``cluster_overlap`` is the histogram intersection of the two distributions (1 = identical).
    """
    with eval_mode(model):
        q = _view(model, query, "query", region)
        r = _view(model, reference, "reference", region)
    return {"query": q, "reference": r, "cluster_overlap": float(np.minimum(q.clusters, r.clusters).sum())}


def write_assignment_figure(
    model, query: torch.Tensor, reference: torch.Tensor, path: Path, title: str = "", region: Region = CENTRE
) -> dict:
    """Draw Fig. 4 + Fig. 7 for one pair into ``path`` (PNG, atomic); returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = assignment_summary(model, query, reference, region)
    fig = plt.figure(figsize=(9, 8.5))
    grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, 0.8])
    for row, (name, image) in enumerate((("query", query), ("reference", reference))):
        data: ViewAssignment = summary[name]
        panels = [
            (image.permute(1, 2, 0).numpy(), f"{name} image", None),
            (data.token_norm, "patch-token norm (DINOv2)", "viridis"),
            (data.keep, "kept by SALAD (1 - dustbin weight)", "jet"),
        ]
        for col, (array, label, cmap) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            shown = ax.imshow(array, cmap=cmap, vmin=0 if cmap == "jet" else None, vmax=1 if cmap == "jet" else None)
            if cmap:
                fig.colorbar(shown, ax=ax, fraction=0.046)
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    ax = fig.add_subplot(grid[2, :])
    clusters = np.arange(len(summary["query"].clusters))
    ax.bar(clusters - 0.2, summary["query"].clusters, width=0.4, label="query")
    ax.bar(clusters + 0.2, summary["reference"].clusters, width=0.4, label="reference")
    ax.set_xlabel("cluster")
    ax.set_ylabel("mean assignment")
    ax.set_title(
        f"cluster distributions over the region rows {region[0]:g}-{region[1]:g}, columns {region[2]:g}-{region[3]:g}"
        f" (overlap {summary['cluster_overlap']:.2f})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return summary
