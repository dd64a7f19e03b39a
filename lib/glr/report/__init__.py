"""What people would rather look at: tables, figures of a CV run, EDA figures, the HTML page.

Every ``draw_*`` function returns its picture and also writes it when given a path: charts are
matplotlib ``Figure`` objects drawn without pyplot (no global figure list, no ``matplotlib.use``:
the caller's backend is left as it is), image sheets are PIL images. A notebook shows either inline
as a cell's last expression; scripts and ``glr report`` pass a path.
"""

from glr.report.eda import (draw_class_long_tail, draw_images_per_continent, draw_landmark_samples,
                            images_per_continent, landmark_counts)
from glr.report.figures import (draw_ablation, draw_retrieval_grid, draw_retrievals, draw_score_distributions,
                                draw_stage_scores)
from glr.report.html import markdown_tables_html, write_report
from glr.report.scores import per_query_scores, stage_scores, worst_queries
from glr.report.sweep import draw_sweep, write_sweep
from glr.report.tables import ablation_table, cv_table, stages_table

__all__ = ["ablation_table", "cv_table", "draw_ablation", "draw_class_long_tail", "draw_images_per_continent",
           "draw_landmark_samples", "draw_retrieval_grid", "draw_retrievals", "draw_score_distributions",
           "draw_stage_scores", "draw_sweep", "images_per_continent", "landmark_counts", "markdown_tables_html",
           "per_query_scores", "stage_scores", "stages_table", "worst_queries", "write_report", "write_sweep"]
