"""README's DuckDB and Polars queries, run as written against a real job output."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from _job_fixtures import job_data, job_model, job_table, ray_session, read_levels, s3_endpoint  # noqa: F401

from agc_ray.distributed.job import JobConfig, run_job

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> str:
    text = README.read_text()
    section = text[text.index("<!-- queries:start -->"):text.index("<!-- queries:end -->")]
    return "\n".join(re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S))


@pytest.fixture(scope="module")
def output(ray_session, tmp_path_factory, job_table, job_model):
    out = tmp_path_factory.mktemp("queries") / "run"
    manifest = run_job(JobConfig(input=str(job_table), output=str(out), model=str(job_model), knn="exact"))
    assert len(manifest["cluster_counts"]) >= 2 and manifest["cluster_counts"][1] > 42
    return out, manifest


def _duckdb_results(out: Path):
    import duckdb

    sql = _blocks("sql").replace("out/run1", str(out))
    statements = [s for s in sql.split(";") if s.strip() and not all(
        line.strip().startswith("--") or not line.strip() for line in s.splitlines())]
    assert len(statements) == 3
    con = duckdb.connect()
    return [con.execute(s).fetchall() for s in statements]


def test_duckdb_queries(output):
    out, manifest = output
    sizes, members, path = _duckdb_results(out)
    levels = read_levels(out)  # cluster ids in row order (ids are row numbers here)
    assert [r[0] for r in sizes] == list(range(len(levels)))
    assert [r[1] for r in sizes] == manifest["cluster_counts"]
    assert [r[2] for r in sizes] == [int(np.bincount(lab).max()) for lab in levels]
    assert [r[0] for r in members] == np.flatnonzero(levels[1] == 42).tolist()
    assert [(r[0], r[1], r[2]) for r in path] == [
        (lvl, int(lab[7]), int((lab == lab[7]).sum())) for lvl, lab in enumerate(levels)]
    assert [r[3] for r in path[:-1]] == [r[1] for r in path[1:]] and path[-1][3] is None


def test_polars_queries_agree_with_duckdb(output):
    out, _ = output
    namespace: dict = {}
    exec(compile(_blocks("python").replace("out/run1", str(out)), "README.md", "exec"), namespace)
    sizes, members, path = _duckdb_results(out)
    assert namespace["sizes"].rows() == [r[:3] for r in sizes]
    assert namespace["members"]["id"].to_list() == [r[0] for r in members]
    assert namespace["path_of_id"].rows() == path
