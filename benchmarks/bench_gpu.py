"""GPU check: the CUDA paths beside the CPU ones, same machine, same model, same table.

    python benchmarks/bench_gpu.py --n 1000000 --json gpu.json

1. The environment: torch and its CUDA device, faiss and whether it sees a GPU (faiss-gpu), and
   whether the CUDA 12 libraries that PyPI's faiss-gpu wheels link are on the machine.
2. ``HiLander(seed=0).fit`` on ``--n-train`` rows on CUDA (``device='auto'`` picks it), then
   ``predict_hierarchy`` of the same ``--n``-row make_faces table with those weights on CUDA and on the
   CPU: wall time, clusters and Fp per level, and whether the partitions agree (ARI per level).
3. Reproducibility on CUDA: two fits with one seed, as shipped (``deterministic_training`` sets
   ``CUBLAS_WORKSPACE_CONFIG`` where CUDA has not started) and under
   ``torch.use_deterministic_algorithms(True)`` throughout: the largest weight difference, whether the
   labels agree, fit seconds. Run it first (``--stages reproducibility,...``) for the shipped setting.
4. Exact kNN by torch on the GPU (blocks of queries against the whole table, ``topk``), fp32 and TF32,
   its recall@10 against faiss' exact search on the CPU for a sample of queries: whether a GPU without
   faiss-gpu could still build the level-0 graph exactly.

Prints a line a stage and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def environment() -> dict:
    import numpy as np
    import torch

    env = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    env["torch_cuda"] = torch.version.cuda  # (the device's name from nvidia-smi: torch's would start CUDA)
    try:
        import faiss

        env["faiss"] = faiss.__version__
        env["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError as e:
        env["faiss"] = f"not importable: {e}"
    # PyPI's faiss-gpu 1.15.1 and faiss-gpu-cu12 link libcudart.so.12 / libcublas.so.12: the loader's
    # cache, CUDA's folders and the nvidia-* wheels beside torch.
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        cache = []
    site = Path(torch.__file__).parents[1]
    found = [Path(p).name for p in cache if "libcublas.so" in p or "libcudart.so" in p]
    for pattern in ("/usr/local/cuda*/lib64/libcu*.so.*", f"{site}/nvidia/*/lib/libcu*.so.*"):
        found += [Path(p).name for p in glob.glob(pattern) if "libcublas.so" in p or "libcudart.so" in p]
    env["cuda_runtime_libs"] = sorted(set(found))
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = str(e)
    return env


def cluster_both(n: int, n_train: int, epochs: int) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import adjusted_rand_score

    from agc_ray import HiLander
    from agc_ray.core.synthetic import make_faces
    from agc_ray.metrics import evaluate

    out = {}
    t0 = time.perf_counter()
    x_train, y_train = make_faces(n_train, seed=1)
    x, y = make_faces(n, seed=2)
    out["make_faces_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"tables: train {x_train.shape}, test {x.shape} in {out['make_faces_seconds']} s", flush=True)

    params = {"seed": 0} | ({"epochs": epochs} if epochs else {})
    t0 = time.perf_counter()
    model = HiLander(**params).fit(x_train, y_train)
    out["fit_device"] = str(model._torch_device())
    out["fit_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"fit on {out['fit_device']}: {out['fit_seconds']} s", flush=True)
    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        runs = {}
        for device in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
            est = HiLander.load(d)
            est.device = device
            t0 = time.perf_counter()
            levels = est.predict_hierarchy(x)
            seconds = time.perf_counter() - t0
            runs[device] = levels
            out[f"predict_{device}_seconds"] = round(seconds, 1)
            out[f"levels_{device}"] = [{"clusters": int(np.unique(lv).size),
                                         "fp": round(evaluate(y, lv)["fp"], 4)} for lv in levels]
            print(f"predict_hierarchy on {device}: {seconds:.1f} s, levels {out[f'levels_{device}']}", flush=True)
    if len(runs) == 2:
        out["levels_equal"] = [bool(np.array_equal(a, b)) for a, b in zip(runs["cuda"], runs["cpu"])]
        out["ari_cuda_vs_cpu"] = [round(adjusted_rand_score(a, b), 6) for a, b in zip(runs["cuda"], runs["cpu"])]
        print(f"cuda vs cpu: equal {out['levels_equal']}, ARI {out['ari_cuda_vs_cpu']}", flush=True)
    return out


def reproducibility(n: int) -> dict:
    import numpy as np
    import torch

    from agc_ray import HiLander
    from agc_ray.core.synthetic import make_faces

    x, y = make_faces(n, seed=1)
    x_test, _ = make_faces(n, seed=2)
    out = {}
    for mode in ("default", "deterministic"):
        fits = []
        try:
            for _ in range(2):
                torch.use_deterministic_algorithms(mode == "deterministic")
                t0 = time.perf_counter()
                est = HiLander(seed=0, epochs=2).fit(x, y)
                seconds = time.perf_counter() - t0
                torch.use_deterministic_algorithms(False)
                weights = {k: v.detach().cpu() for k, v in est.model_.state_dict().items()}
                fits.append((weights, est.predict(x_test), seconds))
        except Exception as e:  # an op without a deterministic CUDA kernel: say which
            torch.use_deterministic_algorithms(False)
            out[mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"reproducibility {mode}: {out[mode]['error']}", flush=True)
            continue
        (w1, l1, s1), (w2, l2, s2) = fits
        diff = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
        out[mode] = {"max_weight_diff": diff, "labels_equal": bool(np.array_equal(l1, l2)),
                     "fit_seconds": [round(s1, 1), round(s2, 1)]}
        print(f"reproducibility {mode}: {out[mode]}", flush=True)
    out["cublas_workspace_config"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    return out


def torch_exact_knn(n: int, k: int, sample: int) -> dict:
    import faiss
    import numpy as np
    import torch

    from agc_ray.core.knn import l2_normalize
    from agc_ray.core.synthetic import make_faces

    x = l2_normalize(make_faces(n, seed=2)[0])
    rng = np.random.default_rng(0)
    queries = np.sort(rng.choice(n, size=sample, replace=False))
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    t0 = time.perf_counter()
    _, truth = flat.search(x[queries], k + 1)
    cpu_sample_seconds = time.perf_counter() - t0
    out = {"faiss_cpu_exact_sample_seconds": round(cpu_sample_seconds, 2), "sample": sample}
    xg = torch.from_numpy(x).cuda()
    block = 8192
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ids = torch.empty((n, k + 1), dtype=torch.int64, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for lo in range(0, n, block):
            scores = xg[lo:lo + block] @ xg.T
            ids[lo:lo + block] = scores.topk(k + 1, dim=1).indices
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        found = ids[torch.from_numpy(queries).cuda()].cpu().numpy()
        # Self excluded on both sides: recall@k of the k true neighbours other than the row.
        hits = [len((set(t) - {q}) & set(f)) / k for q, t, f in zip(queries, truth, found)]
        name = "tf32" if tf32 else "fp32"
        out[f"{name}_seconds"] = round(seconds, 2)
        out[f"{name}_recall"] = round(float(np.mean(hits)), 5)
        print(f"torch exact kNN on GPU, {name}: {seconds:.1f} s for {n} rows, recall@{k} {np.mean(hits):.5f} "
              f"(faiss CPU exact, {sample} queries: {cpu_sample_seconds:.1f} s)", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="rows of the clustered table")
    p.add_argument("--n-train", type=int, default=50_000, help="rows of the training split")
    p.add_argument("--epochs", type=int, default=4, help="0: HiLander's default")
    p.add_argument("--knn-sample", type=int, default=2000, help="queries checked against faiss' exact search")
    p.add_argument("--repro-rows", type=int, default=20_000, help="rows of the reproducibility fits")
    p.add_argument("--stages", default="cluster,reproducibility,torch_exact_knn", help="comma list, in order")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    result = {"n": args.n, "n_train": args.n_train, "environment": environment()}
    print(json.dumps(result["environment"]), flush=True)

    def save():
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))

    save()
    stages = {"cluster": lambda: cluster_both(args.n, args.n_train, args.epochs),
              "reproducibility": lambda: reproducibility(args.repro_rows),
              "torch_exact_knn": lambda: torch_exact_knn(args.n, 10, args.knn_sample)}
    for name in args.stages.split(","):
        stage = stages[name]
        if name != "cluster" and not result["environment"]["cuda_available"]:
            continue
        try:
            result[name] = stage()
        except Exception as e:  # a stage that fails on this machine is a finding: record it, go on
            logging.exception("stage %s failed", name)
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        save()


if __name__ == "__main__":
    main()
