"""Mesh hygiene before UV unwrapping: floaters (small disconnected pieces) are dropped.

    drop_floaters(verts_vx3, faces_fx3, min_fraction=0.01) -> (verts_vx3, faces_fx3)

Score distillation leaves specks of surface in empty space; each becomes a UV chart, wastes
texels and shows as dirt in Blender. Faces are grouped into components that share a vertex; a
component with fewer than `min_fraction` of all faces is dropped (the largest one always stays),
and the vertices no face uses any more go with it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _vertex_components(num_verts: int, faces_fx3: Tensor) -> Tensor:
    """[V] long: a component label per vertex (the smallest vertex id of its component), found
    by propagating the minimum label along the faces' edges until nothing changes."""
    labels_v = torch.arange(num_verts, device=faces_fx3.device)
    faces = faces_fx3.long()
    while True:
        face_min_f = labels_v[faces].min(dim=1).values
        updated_v = labels_v.scatter_reduce(0, faces.reshape(-1), face_min_f.repeat_interleave(3),
                                            reduce="amin")
        updated_v = updated_v[updated_v]  # jump to the label's own label: halves the rounds
        if torch.equal(updated_v, labels_v):
            return labels_v
        labels_v = updated_v


@torch.no_grad()
def drop_floaters(verts_vx3: Tensor, faces_fx3: Tensor, min_fraction: float = 0.01) -> tuple[Tensor, Tensor]:
    """The mesh without components holding fewer than `min_fraction` of its faces."""
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction: expected a fraction in [0, 1), got {min_fraction}")
    if len(faces_fx3) == 0:
        return verts_vx3, faces_fx3
    # 1. A component label per face, and the number of faces in each component.
    labels_v = _vertex_components(len(verts_vx3), faces_fx3)
    face_label_f = labels_v[faces_fx3[:, 0].long()]
    counts = torch.bincount(face_label_f, minlength=len(verts_vx3))
    # 2. Keep the faces of large components (the largest always).
    keep_f = (counts[face_label_f] >= min_fraction * len(faces_fx3)) | (face_label_f == counts.argmax())
    faces = faces_fx3[keep_f].long()
    # 3. Renumber the vertices the kept faces use.
    used_v = torch.zeros(len(verts_vx3), dtype=torch.bool, device=verts_vx3.device)
    used_v[faces.reshape(-1)] = True
    new_id_v = torch.cumsum(used_v.long(), 0) - 1
    return verts_vx3[used_v], new_id_v[faces].to(faces_fx3.dtype)
