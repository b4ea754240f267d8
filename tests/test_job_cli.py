"""jobs/cluster.py: flags, YAML config, the demo, and every bad input (exit code 2, one line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _job_fixtures import job_data, job_model, job_table, ray_session, read_levels, s3_endpoint  # noqa: F401
from _scripts import load_script


cli = load_script("jobs/cluster.py")


def _vectors(n, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _fsl(x):
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])


def _write(path, **cols):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def _table(n=20, d=8, seed=0, start=0):
    return {"id": pa.array(np.arange(start, start + n, dtype=np.int64)), "embedding": _fsl(_vectors(n, d, seed))}


def _bad_inputs(tmp: Path) -> dict:
    """name -> (input path, expected words in the error line)."""
    cases = {}
    cases["missing_path"] = (tmp / "nope", "not found")
    bad = tmp / "notparquet" / "a.parquet"
    bad.parent.mkdir()
    bad.write_text("this is not parquet")
    cases["not_parquet"] = (bad, "not a readable Parquet file")
    _write(tmp / "schemas" / "a.parquet", **_table())
    _write(tmp / "schemas" / "b.parquet", **_table(start=20), extra=pa.array(np.zeros(20)))
    cases["different_schemas"] = (tmp / "schemas", "different schemas")
    _write(tmp / "empty" / "a.parquet", id=pa.array([], pa.int64()), embedding=pa.array([], pa.list_(pa.float32(), 8)))
    cases["zero_rows"] = (tmp / "empty", "zero rows")
    t = _table()
    _write(tmp / "noid.parquet", key=t["id"], embedding=t["embedding"])
    cases["missing_id"] = (tmp / "noid.parquet", "columns found: ['key', 'embedding']")
    _write(tmp / "noemb.parquet", id=t["id"], vec=t["embedding"])
    cases["missing_embedding"] = (tmp / "noemb.parquet", "embedding column 'embedding' not found")
    _write(tmp / "strings.parquet", id=t["id"], embedding=pa.array([["a", "b"]] * 20))
    cases["non_numeric"] = (tmp / "strings.parquet", "of numbers")
    ragged = [list(v) for v in _vectors(20)]
    ragged[7] = ragged[7][:5]
    _write(tmp / "ragged.parquet", id=t["id"], embedding=pa.array(ragged, pa.list_(pa.float32())))
    cases["ragged"] = (tmp / "ragged.parquet", "ragged embedding dimensions: id 0 has 8, id 7 has 5")
    x = _vectors(20)
    x[3, 2] = np.nan
    _write(tmp / "nan.parquet", id=t["id"], embedding=_fsl(x))
    cases["nan"] = (tmp / "nan.parquet", "NaN or Inf in 1 row(s) of a block (example id 3)")
    x = _vectors(20)
    x[5] = 0
    _write(tmp / "zero.parquet", id=t["id"], embedding=_fsl(x))
    cases["all_zero"] = (tmp / "zero.parquet", "all zeros in 1 row(s) of a block (example id 5)")
    _write(tmp / "nullid.parquet", id=pa.array([None] + list(range(1, 20)), pa.int64()), embedding=t["embedding"])
    cases["null_id"] = (tmp / "nullid.parquet", "null value")
    _write(tmp / "dups" / "a.parquet", **_table())
    _write(tmp / "dups" / "b.parquet", **_table(start=19, seed=1))
    cases["duplicate_id"] = (tmp / "dups", "duplicate values (example id 19")
    _write(tmp / "nulllabel.parquet", **t, label=pa.array([1] * 19 + [None], pa.int64()))
    cases["null_label"] = (tmp / "nulllabel.parquet", "label column 'label' has 1 null value(s) (example id 19)")
    return cases


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    return _bad_inputs(tmp_path_factory.mktemp("bad"))


def _run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    return rc, lines


def _assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


CASES = ["missing_path", "not_parquet", "different_schemas", "zero_rows", "missing_id", "missing_embedding",
         "non_numeric", "ragged", "nan", "all_zero", "null_id", "duplicate_id", "null_label"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exit_2(ray_session, bad_inputs, tmp_path, capsys, case):
    """The dry run refuses each bad input with the real run's exact line; neither writes anything."""
    path, words = bad_inputs[case]
    out = tmp_path / "out"
    argv = ["--input", path, "--output", out, "--unsupervised"]
    dry_rc, dry_lines = _run_cli(argv + ["--dry-run"], capsys)
    _assert_nothing_written(out)
    rc, lines = _run_cli(argv, capsys)
    assert rc == 2
    assert len(lines) == 1, lines
    assert words in lines[0]
    _assert_nothing_written(out)
    assert (dry_rc, dry_lines) == (rc, lines)


def test_dry_run_plans_and_writes_nothing(ray_session, job_table, tmp_path, job_model, capsys):
    out = tmp_path / "deep" / "out"
    rc = cli.main(["--input", str(job_table), "--output", str(out), "--model", str(job_model), "--dry-run"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert not (tmp_path / "deep").exists()
    plan = json.loads(stdout.strip().splitlines()[-1])
    assert plan["rows"] == 2500 and plan["dimension"] == 256 and plan["ids_checked"] and plan["rows_checked"] == 2500
    assert plan["knn_method"] == "exact" and plan["label_column"] == "label" and plan["model"] == str(job_model)
    assert plan["peak_memory_gb_per_node"] > 0 and plan["run_seconds"] > 0
    assert "estimate: peak memory" in stdout
    # an existing output: refused without --overwrite (as the real run), left as it was
    out.mkdir(parents=True)
    (out / "old.txt").write_text("keep")
    rc, lines = _run_cli(["--input", job_table, "--output", out, "--model", job_model, "--dry-run"], capsys)
    assert rc == 2 and "exists and is not empty" in lines[0]
    assert cli.main(["--input", str(job_table), "--output", str(out), "--model", str(job_model), "--dry-run",
                     "--overwrite"]) == 0
    assert [p.name for p in out.iterdir()] == ["old.txt"] and [p.name for p in out.parent.iterdir()] == ["out"]


def test_dry_run_says_what_a_missed_recall_target_leads_to(ray_session, tmp_path, capsys, monkeypatch):
    """IVF above 20K rows: the plan names the most probes the tuning may use and what follows when the
    target is still missed: exact search on a table that small, the IVF graph kept on a larger one."""
    from agc_ray.core import knn as core_knn
    from agc_ray.core import recall as core_recall
    from agc_ray.core.recall import probe_cap

    _write(tmp_path / "t.parquet", **_table(30000))
    argv = ["--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "out"), "--unsupervised", "--dry-run"]

    def detail():
        assert cli.main(argv) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_detail"]

    nlist = core_knn.ivf_nlist(30000)
    cap = f"at most {probe_cap(nlist)} a row and {probe_cap(nlist, 30000)} on average"
    assert detail().endswith(f"{cap}; then exact search)")
    monkeypatch.setattr(core_recall, "EXACT_FALLBACK_MAX_ROWS", 20000)  # a miss keeps IVF: a quarter of the cells a row
    cap = f"at most {probe_cap(nlist, max_share=1 / 4)} a row and {probe_cap(nlist, 30000, max_share=1 / 4)} on average"
    assert probe_cap(nlist, 30000, max_share=1 / 4) > probe_cap(nlist, 30000)  # the scan bound does not bind here
    assert detail().endswith(f"{cap}; then the IVF graph kept, reported below target (too many rows to search exactly))")
    assert not (tmp_path / "out").exists()


def test_dry_run_samples_large_tables(tmp_path, monkeypatch):
    """Above the sample size, rows are checked in evenly spread row groups: a bad row there is found."""
    from agc_ray.distributed import plan
    from agc_ray.distributed.errors import InputError
    from agc_ray.distributed.input import check_schema, resolve_input

    x = _vectors(4000)
    x[3900, 1] = np.nan  # in the last row group, which the sample reads
    _write(tmp_path / "t" / "a.parquet", id=pa.array(np.arange(4000)), embedding=_fsl(x))
    pq.write_table(pq.read_table(tmp_path / "t" / "a.parquet"), tmp_path / "t" / "a.parquet", row_group_size=500)
    fs, files = resolve_input(str(tmp_path / "t"))
    schema = check_schema(fs, files, "id", "embedding", None)
    with pytest.raises(InputError, match="NaN or Inf in 1 row.*example id 3900"):
        plan.check_rows(fs, schema, sample_rows=1000)
    x[3900, 1] = 0.5
    x[2200, 1] = np.nan  # in a row group the sample skips: a sample does not see it (the real run does)
    pq.write_table(pa.table({"id": pa.array(np.arange(4000)), "embedding": _fsl(x)}), tmp_path / "t" / "a.parquet",
                   row_group_size=500)
    checked, dim = plan.check_rows(fs, schema, sample_rows=1000)
    assert dim == 8 and 0 < checked < 4000


def test_model_dimension_mismatch(ray_session, bad_inputs, tmp_path, job_model, capsys):
    path, _ = bad_inputs["null_label"]  # any 8-d table
    _write(tmp_path / "ok.parquet", **_table())
    out = tmp_path / "out"
    rc, lines = _run_cli(["--input", tmp_path / "ok.parquet", "--output", out, "--model", job_model], capsys)
    assert rc == 2 and "expects 256-dimensional embeddings, the table's are 8-dimensional" in lines[0]
    _assert_nothing_written(out)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--k", "0"], "--k must be >= 1, got 0"),
        (["--tau", "2"], "--tau must be in [-1.0, 1.0], got 2.0"),
        (["--max-levels", "0"], "--max-levels must be >= 1, got 0"),
        (["--num-shards", "-1"], "--num-shards must be >= 0, got -1"),
        (["--knn", "bogus"], "invalid choice: 'bogus'"),
        (["--knn-recall", "1.5"], "--knn-recall must be in [0.0, 1.0], got 1.5"),
        (["--boundary-closeness", "1.5"], "--boundary-closeness must be in [0.0, 1.0], got 1.5"),
        (["--boundary-closeness", "never"], "invalid closeness_or_off value: 'never'"),
        (["--k", "abc"], "invalid int value: 'abc'"),
        (["--model", "MODEL"], "--model and --unsupervised are exclusive"),
    ],
)
def test_invalid_parameters(ray_session, tmp_path, job_model, capsys, flags, words):
    _write(tmp_path / "ok.parquet", **_table())
    out = tmp_path / "out"
    flags = [str(job_model) if f == "MODEL" else f for f in flags]
    rc, lines = _run_cli(["--input", tmp_path / "ok.parquet", "--output", out, "--unsupervised", *flags], capsys)
    assert rc == 2 and len(lines) == 1 and words in lines[0], lines
    _assert_nothing_written(out)


def test_k_must_match_model(ray_session, job_table, tmp_path, job_model, capsys):
    out = tmp_path / "out"
    rc, lines = _run_cli(["--input", job_table, "--output", out, "--model", job_model, "--k", "5"], capsys)
    assert rc == 2 and "trained with k=10" in lines[0]
    _assert_nothing_written(out)


def test_output_exists_without_overwrite(ray_session, tmp_path, capsys):
    _write(tmp_path / "ok.parquet", **_table())
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    rc, lines = _run_cli(["--input", tmp_path / "ok.parquet", "--output", out, "--unsupervised"], capsys)
    assert rc == 2 and "exists and is not empty (pass --overwrite" in lines[0]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_config_file_and_flags_win(ray_session, job_table, tmp_path, job_model, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(  # a bare YAML `off` is a boolean: it turns the boundary merge off as the flag's 'off' does
        f"input: {job_table}\noutput: {tmp_path / 'ignored'}\nmodel: {job_model}\nmax-levels: 1\nnum_shards: 2\n"
        "boundary-closeness: off\n"
    )
    out = tmp_path / "out"
    rc = cli.main(["--config", str(config), "--output", str(out)])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["max_levels"] == 1 and manifest["parameters"]["num_shards"] == 2
    assert manifest["parameters"]["boundary_closeness"] is None
    assert len(read_levels(out)) == 1
    assert not (tmp_path / "ignored").exists()
    config.write_text("bogus_option: 1\n")
    rc, lines = _run_cli(["--config", config], capsys)
    assert rc == 2 and "unknown option 'bogus_option'" in lines[0]


def test_every_setting_has_a_flag_and_is_documented(capsys):
    """Each JobConfig field is set by a flag (the flag's destination is the field's name), and --help
    documents each flag of the parser."""
    from agc_ray.distributed.job import JobConfig

    parser = cli.build_parser()
    dests = {action.dest: action for action in parser._actions}
    assert set(JobConfig.fields()) <= set(dests), set(JobConfig.fields()) - set(dests)
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text, flag
    for name in ("--previous", "--decode", "--no-early-stop", "--num-cpus", "--knn-recall-sample",
                 "assignments/level=L", "manifest.json"):
        assert name in text


def test_demo_runs(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--demo-rows", "1500", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "agc_ray demo" in out and "output:" in out
    manifest = json.loads((tmp_path / "agc_output" / "demo" / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["input"]["rows"] == 1500
