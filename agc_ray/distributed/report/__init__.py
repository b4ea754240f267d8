"""The run report: one self-contained HTML page (``report.html``) describing a clustering output.

:func:`render_report` turns a manifest and the per-level cluster sizes into HTML (inline CSS, plots as
inline SVG drawn by matplotlib's SVG backend; no script, font, stylesheet or image is fetched).
:func:`write_report` reads what it needs from an output directory (local or ``s3://``, through a
pyarrow filesystem) and writes ``report.html`` next to ``manifest.json``.

- :mod:`~agc_ray.distributed.report.cells`: display forms of values, tables;
- :mod:`~agc_ray.distributed.report.stats`: cluster-size statistics;
- :mod:`~agc_ray.distributed.report.figures`: the plots (inline SVG);
- :mod:`~agc_ray.distributed.report.page`: the sections and :func:`render_report`;
- :mod:`~agc_ray.distributed.report.output`: reading an output, :func:`write_report`.

Ray-free: importing this package imports neither Ray nor torch.
"""

from agc_ray.distributed.report.output import REPORT_NAME, build_report, largest_clusters, read_clusters, write_report
from agc_ray.distributed.report.page import render_report

__all__ = ["REPORT_NAME", "build_report", "largest_clusters", "read_clusters", "render_report", "write_report"]
