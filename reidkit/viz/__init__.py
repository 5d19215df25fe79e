"""Visual explanations: class activation maps, ranking activation maps (CAMA Eq. 10),
branch overlap of multi-branch models, and the HTML ranking report."""

from reidkit.viz.cam import class_activation_map
from reidkit.viz.overlap import branch_overlap, branch_overlap_matrix, format_branch_overlap
from reidkit.viz.ram import aggregate_ranking_activation_map, feature_maps, ranking_activation_map
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
]
