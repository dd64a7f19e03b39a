"""The CV run as one HTML page (``glr report``), PNGs beside it.
"""

from __future__ import annotations

import html
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from glr.data.root import GLDv2Root
from glr.report.common import _as_root, _cv_files
from glr.report.eda import draw_class_long_tail, draw_images_per_continent, draw_landmark_samples
from glr.report.figures import draw_retrieval_grid, draw_score_distributions, draw_stage_scores
from glr.report.scores import _query_scores, worst_queries
from glr.report.tables import cv_table, stages_table
from glr.utils import InputError, atomic_write, read_json_object

log = logging.getLogger(__name__)

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}img{max-width:100%;border:1px solid #eee}
.note{color:#975}"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_tables_html(text: str) -> str:
    """Markdown of the kind ``sweep.md`` holds (``#`` headings, pipe tables, paragraphs) as
    HTML, every text escaped (headings shifted down two levels)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        m = re.match(r"^(#{1,4})\s+(.*)$", line)
        if m:
            level = min(6, len(m.group(1)) + 2)
            out.append(f"<h{level}>{_e(m.group(2))}</h{level}>")
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i].strip())
                i += 1
            rows = [_md_cells(b) for b in block if not re.fullmatch(r"\|?[\s:|-]+\|?", b)]
            if rows:
                out.append("<table><tr>" + "".join(f"<th>{_e(c)}</th>" for c in rows[0]) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows[1:]]
                out.append("</table>")
            continue
        elif line:
            out.append(f"<p>{_e(line)}</p>")
        i += 1
    return "\n".join(out)


def _num(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _query_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["#", "query id", "subset", "ground truth", "AP@100", "top-1 similarity"]
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for n, r in enumerate(rows, 1):
        out.append(f"<tr class=\"query\"><td class=\"n\">{n}</td><td><code>{_e(r['id'])}</code></td>"
                   f"<td>{_e(r['subset'] or '')}</td><td class=\"n\">{r['n_gt']}</td>"
                   f"<td class=\"n\">{_num(r['ap'])}</td><td class=\"n\">{_num(r['top1'])}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _write_per_query_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    import csv  # noqa: PLC0415

    with atomic_write(path, newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "subset", "in_domain", "n_gt", "ap", "top1"])
        for r in rows:
            w.writerow([r["id"], r["subset"] or "", int(r["in_domain"]), r["n_gt"],
                        "" if r["ap"] is None else repr(r["ap"]), "" if r["top1"] is None else repr(r["top1"])])
    return path


def write_report(cv_dir: str | os.PathLike, root: GLDv2Root | str | os.PathLike, out_dir: str | os.PathLike,
                 title: str | None = None, progress: bool = True, n_worst: int = 20, data: bool = True) -> Path:
    """One HTML page of a CV run, its pictures beside it.

    Writes to ``out_dir``: ``report.html`` (atomically; self-contained apart from the pictures,
    linked by relative name; every text escaped), ``stage_scores.png``
    (:func:`draw_stage_scores`), ``retrievals_first.png`` / ``retrievals_worst.png``
    (:func:`draw_retrieval_grid`), ``score_distributions.png``
    (:func:`draw_score_distributions`), ``per_query.csv`` (:func:`per_query_scores`), a copy
    of the run's ``sweep.png`` when it has one, and with ``data`` the data pictures
    ``long_tail.png``, ``continents.png``, ``landmark_samples.png``. The page holds the CV
    table (:func:`cv_table`), the stage table when cv.json has ``stages``, the sweep
    (``sweep.md`` as HTML tables) and the ``n_worst`` in-domain queries with the lowest AP
    (id, subset, ground-truth count, AP@100, top-1 similarity). A root without a retrieval
    solution file gets the pictures that need none and a note. A picture that fails is
    replaced by a note (and a logged warning); the report is still written.

    Args:
        cv_dir: the output folder of :func:`glr.workflows.cv.cv` (``cv.json``, ``submission.csv``).
        root: the GLDv2 root the CV ran on (or its folder).
        out_dir: where the report goes (created).
        title: the page title (default: "CV report: <cv_dir name>").
        progress: a tqdm bar over the pictures.
        n_worst: rows of the worst-queries table.
        data: include the data pictures (train long tail, continents, samples).

    Returns:
        The path of ``report.html``.

    Raises:
        InputError: ``cv_dir`` lacks ``cv.json`` or ``submission.csv``, ``root`` is not a
            GLDv2 root (no ``train.csv``), or a file is malformed; the message names the file.
    """
    cv_dir, out_dir = Path(cv_dir), Path(out_dir)
    cv_json_path, _ = _cv_files(cv_dir)
    root = _as_root(root)
    cv_json = read_json_object(cv_json_path, "cv.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title if title is not None else f"CV report: {cv_dir.resolve().name}"
    scores = _query_scores(root, cv_dir, top1=True) if root.solution_path("retrieval") is not None else None
    drawn = _draw_figures(_figures(cv_dir, root, cv_json, scores, data), out_dir, progress)

    body = [f"<h1>{_e(title)}</h1>",
            f"<p>CV folder <code>{_e(cv_dir)}</code>, dataset root <code>{_e(root.root)}</code> "
            f"({_e(root.layout)} layout), descriptor {_e(cv_json.get('descriptor', '?'))}, "
            f"protocol {_e(cv_json.get('protocol', 'v2.1'))}.</p>"]
    if cv_json.get("val_leak"):
        body.append("<p class=\"note\">Trained on this root's validation ground truth (allow_val_leak): "
                    "these figures are not a valid CV.</p>")
    body += ["<h2>Scores</h2>", f"<pre>{_e(cv_table(cv_json))}</pre>"]
    if cv_json.get("stages"):
        body.append(f"<pre>{_e(stages_table(cv_json['stages']))}</pre>")
    body += drawn.get("scores", [])
    sweep_md = cv_dir / "sweep.md"
    if sweep_md.is_file() or "sweep" in drawn:
        body.append("<h2>Post-processing sweep</h2>")
        if sweep_md.is_file():
            body.append(markdown_tables_html(sweep_md.read_text(encoding="utf-8")))
        body += drawn.get("sweep", [])
    body += ["<h2>Retrievals</h2>"] + drawn.get("retrievals", [])
    body += _queries_section(scores, drawn.get("queries", []), out_dir, n_worst)
    if data:
        body += ["<h2>The data</h2>"] + drawn.get("data", [])
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    path = out_dir / "report.html"
    with atomic_write(path, encoding="utf-8") as f:
        f.write(page)
    return path


#: One picture of the page: (section, file name, caption, draw(path)).
_Picture = tuple[str, str, str, Callable[[Path], Any]]


def _figures(cv_dir: Path, root: GLDv2Root, cv_json: dict[str, Any], scores: list[dict[str, Any]] | None,
             data: bool) -> list[_Picture]:
    """The pictures of the page, in page order (``scores`` None: the root has no solution file)."""
    has_solution = scores is not None
    figures: list[_Picture] = [
        ("scores", "stage_scores.png", "Retrieval mAP@100 per stage, the run, baselines and the sweep's steps",
         lambda p: draw_stage_scores(cv_json, p)),
        ("retrievals", "retrievals_first.png",
         "The first queries with ground truth and their top 5 (green: in the ground truth, red: not)"
         if has_solution else "The first queries and their top 5 (no ground truth: grey frames)",
         lambda p: draw_retrieval_grid(root, cv_dir, p, which="first", scores=scores)),
    ]
    if has_solution:
        figures += [
            ("retrievals", "retrievals_worst.png", "The in-domain queries with the lowest AP@100, lowest first",
             lambda p: draw_retrieval_grid(root, cv_dir, p, which="worst", scores=scores)),
            ("queries", "score_distributions.png",
             "Top-1 similarity of queries with and without ground truth (a non-landmark threshold lies between)",
             lambda p: draw_score_distributions(root, cv_dir, p, scores=scores)),
        ]
    if (cv_dir / "sweep.png").is_file():
        figures.append(("sweep", "sweep.png", "The post-processing sweep (left: the pipeline; right: every setting)",
                        lambda p: Path(shutil.copyfile(cv_dir / "sweep.png", p))))
    if data:
        figures += [
            ("data", "long_tail.png", "Train images per landmark, sorted (log scale)",
             lambda p: draw_class_long_tail(root, p)),
            ("data", "continents.png", "Train images per continent", lambda p: draw_images_per_continent(root, p)),
            ("data", "landmark_samples.png", "Train images of random landmarks",
             lambda p: draw_landmark_samples(root, p)),
        ]
    return figures


def _draw_figures(figures: Sequence[_Picture], out_dir: Path, progress: bool) -> dict[str, list[str]]:
    """Draw each picture into ``out_dir``; section -> its HTML (a figure, or a note when the
    drawing failed: a picture never loses the rest of the report, but bad input still raises)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    drawn: dict[str, list[str]] = {}
    for section, name, caption, draw in tqdm(figures, desc="report", disable=not progress, leave=False):
        try:
            draw(out_dir / name)
            drawn.setdefault(section, []).append(
                f"<figure><img src=\"{_e(name)}\" alt=\"{_e(caption)}\"><figcaption>{_e(caption)}</figcaption>"
                "</figure>")
        except InputError:
            raise
        except Exception as e:  # a picture must never lose the rest of the report
            log.warning("report: could not draw %s: %s", name, e)
            drawn.setdefault(section, []).append(f"<p class=\"note\">could not draw {_e(name)}: {_e(e)}</p>")
    return drawn


def _queries_section(scores: list[dict[str, Any]] | None, pictures: list[str], out_dir: Path,
                     n_worst: int) -> list[str]:
    """The page's "Queries" section (and ``per_query.csv`` beside it when there are scores)."""
    body = ["<h2>Queries</h2>"]
    if scores is None:
        body.append(f"<p class=\"note\">no {_e('retrieval_solution_v2.1.csv')} in the root: per-query scores, "
                    "the worst queries and the similarity distributions need the ground truth.</p>")
        return body
    _write_per_query_csv(scores, out_dir / "per_query.csv")
    ind = [r for r in scores if r["in_domain"]]
    lines = []
    for s in ("public", "private"):
        aps = [r["ap"] for r in ind if r["subset"] == s]
        if aps:
            lines.append(f"{s.capitalize()}: {len(aps)} queries, mean AP@100 {sum(aps) / len(aps):.4f}, "
                         f"{sum(a == 0 for a in aps)} with AP 0")
    lines.append(f"{len(scores) - len(ind)} queries without retrieval ground truth (non-landmark or Ignored)")
    body.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in lines) + "</ul>")
    body += pictures
    worst = worst_queries(scores, n_worst)
    body.append(f"<h3>The {len(worst)} in-domain queries with the lowest AP@100</h3>")
    body.append(_query_table(worst))
    body.append("<p>Every query: <a href=\"per_query.csv\">per_query.csv</a>.</p>")
    return body
