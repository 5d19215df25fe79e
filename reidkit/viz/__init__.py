"""Visual explanations: class activation maps, ranking activation maps (CAMA Eq. 10),
Grad-CAM of any layer and score, IANet receptive fields, branch overlap of multi-branch
models, the HTML ranking report and the rank-1 mismatch browser."""

from reidkit.viz.cam import class_activation_map
from reidkit.viz.grad_cam import (
    class_logit,
    compute_grad_cam,
    grad_cam,
    map_overlap,
    map_overlap_matrix,
    pair_grad_cam,
    pair_similarity,
    part_logit,
    similarity_to,
)
from reidkit.viz.grid import image_grid, overlay_maps, save_image_grid
from reidkit.viz.mismatches import (
    load_mismatch_tags,
    rank1_mismatches,
    tag_counts,
    write_mismatch_browser,
)
from reidkit.viz.overlap import branch_overlap, branch_overlap_matrix, format_branch_overlap
from reidkit.viz.ram import aggregate_ranking_activation_map, feature_maps, ranking_activation_map
from reidkit.viz.relation import relation_grid, relation_maps, save_relation_grid
from reidkit.viz.report import build_ranking_report, render_report_html

__all__ = [
    "class_activation_map",
    "ranking_activation_map",
    "aggregate_ranking_activation_map",
    "feature_maps",
    "branch_overlap",
    "branch_overlap_matrix",
    "format_branch_overlap",
    "build_ranking_report",
    "render_report_html",
    "grad_cam",
    "compute_grad_cam",
    "class_logit",
    "part_logit",
    "pair_similarity",
    "similarity_to",
    "pair_grad_cam",
    "map_overlap",
    "map_overlap_matrix",
    "overlay_maps",
    "image_grid",
    "save_image_grid",
    "relation_maps",
    "relation_grid",
    "save_relation_grid",
    "rank1_mismatches",
    "write_mismatch_browser",
    "load_mismatch_tags",
    "tag_counts",
]
