"""agc_ray.distributed.report and jobs/report.py: the self-contained HTML run report (no Ray)."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from _job_fixtures import s3_endpoint  # noqa: F401
from _scripts import load_script

from agc_ray.distributed.report import largest_clusters, read_clusters, render_report, write_report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")


cli = load_script("jobs/report.py")

# level 0: 12 clusters over 100 rows; level 1: 4 clusters (parents of level 0); level 2: 2 clusters (top)
SIZES = {
    0: np.array([30, 1, 1, 20, 2, 15, 10, 1, 5, 7, 4, 4], dtype=np.int64),
    1: np.array([40, 31, 25, 4], dtype=np.int64),
    2: np.array([71, 29], dtype=np.int64),
}
PARENTS = {0: [0, 1, 1, 2, 3, 0, 1, 1, 2, 1, 0, 3], 1: [0, 0, 1, 1], 2: None}
TIMINGS = {"read_seconds": 1.25, "knn_seconds": 4.5, "score_seconds": 3.25, "decode_seconds": 0.75,
           "aggregate_seconds": 0.5, "write_seconds": 2.0, "total_seconds": 13.0}


def _metrics(level):
    return {"pairwise_precision": 0.99, "pairwise_recall": 0.5 + 0.1 * level, "fp": 0.6 + 0.1 * level,
            "bcubed_precision": 0.98, "bcubed_recall": 0.55, "fb": 0.7 + 0.05 * level, "nmi": 0.9,
            "ari": 0.61, "n_clusters": int(SIZES[level].size)}


def make_manifest(*, metrics=False, churn=False, input_path="/data/emb/"):
    levels = []
    nodes = 100
    for lv, sizes in SIZES.items():
        item = {"level": lv, "nodes": nodes, "knn_method": "ivf" if lv == 0 else "exact", "knn_seconds": 1.5,
                "score_seconds": 1.0, "edges": nodes - sizes.size, "clusters": int(sizes.size), "decode_seconds": 0.25}
        if lv == 0:
            item["knn_recall"], item["knn_nprobe"] = 0.9876, 8
        if metrics:
            item["metrics"] = _metrics(lv)
        if churn:
            item["churn"] = {"previous_clusters": 11 + lv, "kept": 9, "split": 1, "merged": 2, "new": 3, "gone": 1,
                             "changed_row_share": 0.125}
        levels.append(item)
        nodes = int(sizes.size)
    m = {
        "status": "succeeded",
        "input": {"path": input_path, "files": 2, "rows": 100, "dimension": 64, "id_column": "id",
                  "embedding_column": "embedding", "label_column": "label" if metrics else None},
        "output": "/out/run1",
        "parameters": {"k": 10, "tau": 0.9, "max_levels": 10, "knn": "auto", "decode": "prob", "early_stop": True,
                       "seed": 0, "num_shards": 2, "unsupervised": False},
        "model": {"path": "/models/m1", "params": {"epochs": 4, "k": 10}, "n_features_in": 64},
        "versions": {"agc_ray": "0.1.0", "ray": "2.60.0", "pyarrow": pa.__version__},
        "timings": dict(TIMINGS),
        "levels": levels,
        "cluster_counts": [int(s.size) for s in SIZES.values()],
    }
    if churn:
        m["previous"] = {"path": "s3://bucket/previous-run"}
    return m


def cluster_table(level):
    sizes = SIZES[level]
    c = sizes.size
    parent = PARENTS[level]
    return pa.table({
        "cluster_id": pa.array(np.arange(c, dtype=np.int64)),
        "size": pa.array(sizes),
        "peak_id": pa.array(np.arange(c, dtype=np.int64) * 1000 + 7 + level),
        "parent_cluster_id": pa.nulls(c, pa.int64()) if parent is None else pa.array(parent, pa.int64()),
    })


def largest_of(level):
    t = cluster_table(level)
    return t.take(pa.array(largest_clusters(SIZES[level])))


@functools.lru_cache(maxsize=None)
def render(*, metrics=False, churn=False):
    """The page of the hand-made output (cached: matplotlib takes a fraction of a second per page)."""
    return render_page(make_manifest(metrics=metrics, churn=churn))


def render_page(manifest: dict) -> str:
    """The page of ``manifest`` over the hand-made cluster sizes."""
    return render_report(manifest, SIZES, {lv: largest_of(lv) for lv in SIZES})


def write_output(root: Path, manifest: dict | None, *, split_level0: bool = False) -> Path:
    for lv in SIZES:
        d = root / "clusters" / f"level={lv}"
        d.mkdir(parents=True)
        t = cluster_table(lv)
        if split_level0 and lv == 0:  # two part files: positions span files
            pq.write_table(t.slice(0, 5), d / "part-00000.parquet")
            pq.write_table(t.slice(5), d / "part-00001.parquet")
        else:
            pq.write_table(t, d / "part-00000.parquet")
    if manifest is not None:
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _section(html_text, title):
    """The text of the <section> whose <h2> starts with ``title``."""
    m = re.search(r"<section><h2>" + re.escape(title) + r".*?</section>", html_text, re.S)
    assert m, f"no section {title!r}"
    return m.group(0)


def _rows(section_html):
    """Table rows as lists of cell texts (tags stripped)."""
    out = []
    for tr in re.findall(r"<tr>(.*?)</tr>", section_html, re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)
        if cells:
            out.append([re.sub(r"<[^>]+>", "", c).strip() for c in cells])
    return out


# -- render_report --------------------------------------------------------------------------------------
def test_self_contained_page():
    page = render(metrics=True, churn=True)
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""src\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "<link" not in page.lower()
    assert "<script" not in page.lower()
    assert "@import" not in page and "url(http" not in page
    assert not re.search(r'href="(?!#)', page)  # only in-document references (SVG clip paths)
    assert page.count("<svg") >= 3  # sizes, metrics, timings
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "SVG ids collide between figures"
    for ref in set(re.findall(r'url\(#([^)]+)\)', page)):
        assert ref in ids


def test_levels_table_counts():
    page = render()
    rows = _rows(_section(page, "Levels"))
    assert [r[:4] for r in rows] == [["0", "100", "12", "88"], ["1", "12", "4", "8"], ["2", "4", "2", "2"]]
    level0 = rows[0]
    assert "25.0%" in level0  # 3 of 12 clusters are singletons
    assert "3.0%" in level0  # 3 of 100 rows are singletons
    assert level0[9] == "30" and level0[10] == "30.0%"  # max size, largest cluster's share of rows
    assert "ivf nprobe 8 recall 0.988" in level0 and "below target" not in level0
    assert rows[1][11] == "exact"


def test_levels_table_says_when_the_recall_target_was_missed():
    """A table too large to search exactly keeps its IVF graph below the recall target: the kNN cell says so."""
    manifest = make_manifest()
    manifest["levels"][0].update(knn_recall=0.8123, knn_recall_target_met=False)
    level0 = _rows(_section(render_page(manifest), "Levels"))[0]
    assert "ivf nprobe 8 recall 0.812 below target" in level0


def test_levels_table_shows_the_mean_cells_of_a_probe_margin():
    """A search with a probe margin probes a number of cells that varies per row: their mean is shown."""
    manifest = make_manifest()
    manifest["levels"][0].update(knn_nprobe=512, knn_probe_margin=0.05695, knn_probes_mean=2.27)
    level0 = _rows(_section(render_page(manifest), "Levels"))[0]
    assert "ivf cells a row 2.3 recall 0.988" in level0 and "nprobe" not in level0


def test_levels_table_shows_derived_graphs_and_the_linkage_threshold():
    """A derived graph says how many rows were searched again; a linkage level shows its average link's
    threshold before the peaks' tau."""
    manifest = make_manifest()
    manifest["levels"][1].update(knn_method="derived", knn_recall=1.0, knn_rescanned=1234)
    manifest["levels"][2].update(linkage=0.37728, tau=0.61)
    rows = _rows(_section(render_page(manifest), "Levels"))
    assert "derived rescanned 1,234 recall 1.000" in rows[1]
    assert rows[2][12] == "0.377 average link; peaks 0.610" and rows[1][12] != rows[2][12]


def test_header_and_run():
    page = render()
    assert "succeeded" in page
    assert "/data/emb/" in page and "/out/run1" in page and "/models/m1" in page
    assert "20,000" not in page and "100" in page
    for text in ("tau", "0.9", "max_levels", "2.60.0", pa.__version__):
        assert text in page


def test_largest_clusters_top_ids():
    page = render()
    sec = _section(page, "Largest clusters")
    tables = re.findall(r"<h3>Level (\d+)</h3>(.*?)</table>", sec, re.S)
    assert [lv for lv, _ in tables] == ["0", "1", "2"]
    rows0 = _rows(tables[0][1])
    assert len(rows0) == 10
    # sizes 30, 20, 15, 10, 7, 5, 4, 4 (ties: lower cluster id first), 2, 1
    assert [r[0] for r in rows0] == ["0", "3", "5", "6", "9", "8", "10", "11", "4", "1"]
    assert rows0[0] == ["0", "30", "30.0%", "7", "0"]  # cluster_id, size, % rows, peak_id, parent
    rows2 = _rows(tables[2][1])
    assert rows2 == [["0", "71", "71.0%", "9", "—"], ["1", "29", "29.0%", "1009", "—"]]


def test_timings():
    page = render()
    sec = _section(page, "Timings")
    rows = {r[0]: r[1:] for r in _rows(sec)}
    assert rows["knn"] == ["4.50 s", "34.6%"]
    assert rows["read"] == ["1.25 s", "9.6%"]
    assert rows["total"] == ["13.0 s", "100.0%"]
    assert "<svg" in sec


def test_metrics_only_with_labels():
    plain = render()
    assert "Quality metrics" not in plain
    assert ">Fp<" not in plain
    page = render(metrics=True)
    sec = _section(page, "Quality metrics")
    rows = _rows(sec.split("Best level per metric")[0])
    assert rows[0][:4] == ["0", "0.990", "0.500", "0.600"]
    assert rows[2][3] == "0.800"  # Fp at level 2
    assert "NMI" in sec and "ARI" in sec
    assert ">Fb<" in _section(page, "Levels")


def test_churn_only_when_present():
    assert "Churn" not in render(metrics=True)
    page = render(churn=True)
    sec = _section(page, "Churn")
    assert "s3://bucket/previous-run" in sec
    rows = _rows(sec)
    assert rows[0] == ["0", "11", "12", "9", "1", "2", "3", "1", "12.5%"]
    assert len(rows) == 3


def test_user_strings_escaped():
    bad = '/data/<script>alert("x")</script>&'
    manifest = make_manifest(input_path=bad)
    manifest["output"] = "/out/<b>o</b>"
    manifest["parameters"]["knn"] = "<img src=x onerror=alert(1)>"
    manifest["levels"][0]["knn_method"] = "<i>ivf</i>"
    largest = {0: pa.table({"cluster_id": [1], "size": [5], "peak_id": ["<peak>"], "parent_cluster_id": [None]})}
    page = render_report(manifest, SIZES, largest)
    assert "<script" not in page and "<img" not in page and "<i>ivf" not in page and "<b>o</b>" not in page
    assert "/data/&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;peak&gt;" in page


def test_degenerate_inputs_render():
    """No sizes, no largest table, missing optional keys: still one page."""
    m = make_manifest()
    del m["timings"], m["versions"], m["cluster_counts"]
    m["model"] = None
    page = render_report(m, {})
    assert "no cluster table for level(s) 0, 1, 2" in page
    assert "unsupervised" in page
    page = render_report({"status": "succeeded", "levels": []}, {})
    assert "</html>" in page


def test_page_size_with_ten_levels():
    rng = np.random.default_rng(0)
    sizes = {lv: rng.zipf(1.6 + 0.05 * lv, size=200_000 // (lv + 1)).clip(1, 10**6) for lv in range(10)}
    m = make_manifest(metrics=True, churn=True)
    m["levels"] = [dict(m["levels"][0], level=lv, clusters=int(s.size), metrics=_metrics(0)) for lv, s in sizes.items()]
    largest = {lv: pa.table({"cluster_id": np.arange(10), "size": np.sort(s)[::-1][:10], "peak_id": np.arange(10),
                             "parent_cluster_id": np.arange(10)}) for lv, s in sizes.items()}
    page = render_report(m, sizes, largest)
    assert len(page.encode()) < 300_000
    assert page.count("<h3>Level ") == 10


def test_largest_clusters_positions():
    sizes = np.array([3, 9, 1, 9, 7, 9])
    assert largest_clusters(sizes, 2).tolist() == [1, 3]
    assert largest_clusters(sizes, 4).tolist() == [1, 3, 5, 4]
    assert largest_clusters(sizes, 10).tolist() == [1, 3, 5, 4, 0, 2]
    assert largest_clusters(np.zeros(0, np.int64)).tolist() == []


# -- write_report and the CLI ------------------------------------------------------------------------------
def test_write_report_local(tmp_path):
    root = write_output(tmp_path / "out", make_manifest(metrics=True), split_level0=True)
    out = write_report(pafs.LocalFileSystem(), str(root))
    assert out == str(root / "report.html")
    page = (root / "report.html").read_text()
    assert "Quality metrics" in page
    rows0 = _rows(re.search(r"<h3>Level 0</h3>(.*?)</table>", page, re.S).group(1))
    assert [r[0] for r in rows0][:3] == ["0", "3", "5"]  # across two part files
    assert rows0[2] == ["5", "15", "15.0%", "5007", "0"]


def test_write_report_with_manifest_argument(tmp_path):
    """The job's call: the manifest is passed (staging has no manifest.json yet)."""
    root = write_output(tmp_path / "staging", None)
    out = write_report(pafs.LocalFileSystem(), str(root), make_manifest(churn=True))
    assert Path(out).is_file() and "Churn" in Path(out).read_text()
    sizes, top = read_clusters(pafs.LocalFileSystem(), str(root), 1)
    assert sizes.tolist() == SIZES[1].tolist()
    assert top.column("cluster_id").to_pylist() == [0, 1, 2, 3]
    assert read_clusters(pafs.LocalFileSystem(), str(root), 7) is None


def test_report_module_is_ray_free():
    code = ("import sys, agc_ray.distributed.report, agc_ray.distributed.input, agc_ray.distributed.output, agc_ray.distributed.shards; "
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_without_manifest_exits_2(tmp_path):
    root = write_output(tmp_path / "out", None)
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "report.py"), str(root)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {root} has no manifest.json: not a completed clustering output"]
    assert not (root / "report.html").exists()


def test_cli_bad_outputs(tmp_path, capsys):
    failed = copy.deepcopy(make_manifest())
    failed["status"] = "failed"
    root = write_output(tmp_path / "failed", failed)
    assert cli.main([str(root)]) == 2
    assert "is not a completed output (manifest status 'failed'" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    assert cli.main([str(tmp_path / "broken")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "missing")]) == 2
    assert cli.main([]) == 2


def test_cli_writes_report(tmp_path, capsys):
    root = write_output(tmp_path / "out", make_manifest(metrics=True))
    assert cli.main([str(root)]) == 0
    assert (root / "report.html").is_file()
    other = tmp_path / "elsewhere" / "r.html"
    assert cli.main([str(root), "--out", str(other)]) == 0
    assert "Quality metrics" in other.read_text()
    assert f"report: {other}" in capsys.readouterr().out


def test_cli_screenshot_without_chromium(tmp_path, capsys):
    root = write_output(tmp_path / "out", make_manifest())
    assert cli.main([str(root), "--screenshot", str(tmp_path / "r.png"), "--chromium", "no-such-chromium-binary"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no no-such-chromium-binary binary found" in err
    assert not (root / "report.html").exists()  # failed before any work


def test_cli_s3(tmp_path, s3_endpoint, capsys):  # noqa: F811
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="reports")
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1")
    local = write_output(tmp_path / "out", make_manifest())
    pafs.copy_files(str(local), "reports/run1", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert cli.main(["s3://reports/run1"]) == 0
    with fs.open_input_stream("reports/run1/report.html") as f:
        assert "Largest clusters" in f.read().decode()
    assert cli.main(["s3://reports/none"]) == 2
    assert "s3://reports/none has no manifest.json" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH")
def test_headless_screenshot(tmp_path):
    root = write_output(tmp_path / "out", make_manifest(metrics=True, churn=True))
    png = tmp_path / "shot" / "report.png"
    assert cli.main([str(root), "--screenshot", str(png)]) == 0
    assert png.is_file() and png.stat().st_size > 20_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
