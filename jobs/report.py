"""Regenerate the HTML run report (report.html) of a completed clustering output, local or s3://.

Reads OUTPUT/manifest.json and the size, cluster_id, peak_id and parent_cluster_id columns of
OUTPUT/clusters/level=*/ and writes one self-contained page (inline CSS and SVG plots, nothing is
fetched when it is opened): run header, per-level counts and cluster-size statistics, size
distributions, largest clusters, timings, metrics (labelled runs) and churn (incremental runs).

No Ray is started. Exit codes: 0 success, 2 OUTPUT is not a completed output or bad arguments (one line
on stderr), 1 other failures (including --screenshot without a Chromium binary).

Examples:
  python jobs/report.py agc_output/demo
  python jobs/report.py s3://bucket/clusters/ --out /tmp/report.html
  python jobs/report.py agc_output/demo --screenshot /tmp/report.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error on stderr and exit code 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jobs/report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="OUTPUT", help="a completed output directory or s3:// prefix")
    p.add_argument("--out", metavar="FILE",
                   help="where to write the page, local or s3:// (default: OUTPUT/report.html)")
    p.add_argument("--screenshot", metavar="PNG",
                   help="also render the page in headless Chromium and save a full-page PNG (local path)")
    p.add_argument("--chromium", metavar="BIN",
                   help=f"Chromium/Chrome binary for --screenshot (default: the first of {', '.join(CHROMIUM_NAMES)} on PATH)")
    p.add_argument("--window-size", default="1280,2400", metavar="W,H",
                   help="screenshot size in CSS pixels (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and other libraries' INFO lines (default: theirs from WARNING)")
    return p


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium binary to use: ``explicit`` if executable, else the first known name on PATH."""
    if explicit:
        return shutil.which(explicit)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(chromium: str, html_path: str, png: str, window_size: str = "1280,2400", timeout: float = 120) -> str:
    """Render a local HTML file with headless Chromium into ``png``; RuntimeError with Chromium's output on failure."""
    png = os.path.abspath(png)
    os.makedirs(os.path.dirname(png), exist_ok=True)
    if os.path.exists(png):
        os.remove(png)
    with tempfile.TemporaryDirectory(prefix="agc-report-chromium-") as profile:
        cmd = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
               f"--screenshot={png}", f"--window-size={window_size}", "file://" + os.path.abspath(html_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{chromium} did not finish the screenshot within {timeout:.0f}s") from None
    if not os.path.exists(png) or os.path.getsize(png) == 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise RuntimeError(f"{chromium} wrote no screenshot (exit {proc.returncode}): {' | '.join(tail)}")
    return png


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, one line already printed)
        return int(e.code or 0)
    from agc_ray.distributed import logs
    from agc_ray.distributed.commit import read_manifest
    from agc_ray.distributed.errors import InputError, one_line
    from agc_ray.distributed.input import filesystem_for

    logs.configure(args.verbose)

    chromium = None
    if args.screenshot:  # fail before any work
        chromium = find_chromium(args.chromium)
        if chromium is None:
            what = args.chromium or " or ".join(CHROMIUM_NAMES[:2])
            print(f"error: --screenshot needs headless Chromium: no {what} binary found on PATH "
                  "(install it, e.g. apt-get install chromium, or pass --chromium BIN)", file=sys.stderr)
            return EXIT_FAILURE
    try:
        fs, path = filesystem_for(args.output)
        manifest, _ = read_manifest(fs, path, args.output)  # InputError unless a completed output
        from agc_ray.distributed.report import REPORT_NAME, build_report

        text = build_report(fs, path, manifest)
        if args.out:
            out_fs, out_path = filesystem_for(args.out)
            shown = args.out
        else:
            import posixpath

            out_fs, out_path = fs, posixpath.join(path, REPORT_NAME)
            shown = args.output.rstrip("/") + "/" + REPORT_NAME
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if out_fs.type_name == "local":
            os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with out_fs.open_output_stream(out_path) as f:
            f.write(text.encode("utf-8"))
    except OSError as e:
        print(f"error: cannot write {shown}: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"report: {shown} ({len(text.encode()) / 1024:.0f} KiB)")
    if args.screenshot:
        local = out_path if out_fs.type_name == "local" else None
        try:
            if local is None:  # an s3:// page: render a local copy
                with tempfile.NamedTemporaryFile("w", suffix=".html", delete=False, encoding="utf-8") as tmp:
                    tmp.write(text)
                    local = tmp.name
            png = screenshot(chromium, local, args.screenshot, args.window_size)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            if local is not None and local != out_path:
                os.remove(local)
        print(f"screenshot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
