"""Graph clustering metrics on known answers, and the datasets of agc_ray.data."""

from __future__ import annotations

import subprocess
import sys
import time

import networkx as nx
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch_geometric.utils import is_undirected

from agc_ray.clusters import KMeansClusterHead
from agc_ray.data import DatasetUnavailableError, get_dataset
from agc_ray.data.datasets import PLANETOID_HOST, can_reach
from agc_ray.metrics import acc, conductance, f1, label_metrics, modularity, nmi, structure_metrics


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Small graphs: one intra-op thread is as fast, and avoids OpenMP spin-waiting that makes
    # multi-threaded torch ~100x slower when other processes keep the 2 cores busy.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- label metrics ------------------------------------------------------------------------------------


def test_acc_and_f1_of_a_permuted_labeling_are_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, size=500)
    perm = rng.permutation(7) + 10  # other label values, too
    assert acc(y, perm[y]) == 1.0
    assert f1(y, perm[y]) == 1.0
    assert label_metrics(torch.from_numpy(y), torch.from_numpy(perm[y]))["ACC"] == 1.0


def test_acc_and_f1_known_answer():
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [5, 5, 9, 9, 9, 9]  # cluster 5 -> class 0, cluster 9 -> class 1
    assert acc(y_true, y_pred) == pytest.approx(5 / 6)
    # class 0: P = 2/2, R = 2/3 -> 0.8; class 1: P = 3/4, R = 1 -> 6/7
    assert f1(y_true, y_pred) == pytest.approx((0.8 + 6 / 7) / 2)
    mapped = np.where(np.asarray(y_pred) == 5, 0, 1)
    assert f1(y_true, y_pred) == pytest.approx(f1_score(y_true, mapped, average="macro"))


def test_acc_with_more_clusters_than_classes():
    # the two halves of class 0 cannot both be matched to it
    assert acc([0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(4 / 6)
    assert acc([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx(0.5)  # one cluster for two classes


def test_label_metrics_names_and_errors():
    out = label_metrics([0, 0, 1, 1], [1, 1, 0, 0], metrics=("NMI", "ARI", "ACC", "F1"))
    assert out == pytest.approx({"NMI": 1.0, "ARI": 1.0, "ACC": 1.0, "F1": 1.0})
    assert list(label_metrics([0, 1], [0, 1], metrics="NMI")) == ["NMI"]
    with pytest.raises(ValueError, match="Invalid metric"):
        label_metrics([0, 1], [0, 1], metrics="ACCURACY")
    with pytest.raises(ValueError, match="differ in length"):
        acc([0, 1, 1], [0, 1])


# --- structure metrics --------------------------------------------------------------------------------


def _pyg_edges(g: nx.Graph) -> torch.Tensor:
    und = torch.tensor(list(g.edges())).t()
    return torch.cat([und, und.flip(0)], dim=1)


def test_modularity_matches_networkx_on_karate_club():
    g = nx.karate_club_graph()
    g = nx.Graph(g.edges())  # unweighted
    clubs = nx.get_node_attributes(nx.karate_club_graph(), "club")
    labels = np.array([clubs[i] == "Officer" for i in range(34)], dtype=np.int64)
    communities = [set(np.flatnonzero(labels == c)) for c in (0, 1)]
    assert modularity(_pyg_edges(g), labels) == pytest.approx(nx.community.modularity(g, communities))
    # a three-way split, with torch labels
    labels3 = torch.arange(34) % 3
    communities3 = [set(np.flatnonzero(labels3.numpy() == c)) for c in range(3)]
    assert modularity(_pyg_edges(g), labels3) == pytest.approx(nx.community.modularity(g, communities3))


def test_conductance_and_modularity_of_two_triangles():
    und = torch.tensor([[0, 0, 1, 3, 3, 4, 2], [1, 2, 2, 4, 5, 5, 3]])
    edge_index = torch.cat([und, und.flip(0)], dim=1)
    split = [0, 0, 0, 1, 1, 1]
    assert conductance(edge_index, split) == pytest.approx(1 / 7)  # 1 of 7 edges is cut
    assert modularity(edge_index, split) == pytest.approx(6 / 7 - 0.5)
    assert conductance(edge_index, [0] * 6) == 0.0
    assert modularity(edge_index, [0] * 6) == pytest.approx(0.0)
    assert structure_metrics(edge_index, split) == pytest.approx({"Mod": 6 / 7 - 0.5, "Cond": 1 / 7})
    with pytest.raises(ValueError, match="Invalid metric"):
        structure_metrics(edge_index, split, metrics=("Mod", "NMI"))
    with pytest.raises(ValueError, match=r"shape \(2, E\)"):
        modularity(edge_index[0], split)


# --- datasets -----------------------------------------------------------------------------------------


def test_csbm_dataset_is_deterministic_and_informative():
    x, edge_index, y = get_dataset("csbm")
    x2, edge_index2, y2 = get_dataset("CSBM")
    assert torch.equal(x, x2) and torch.equal(edge_index, edge_index2) and torch.equal(y, y2)
    n = x.shape[0]
    k = int(y.max()) + 1
    assert 2000 <= n <= 5000 and 5 <= k <= 10
    assert x.dtype == torch.float32 and edge_index.dtype == torch.int64 and y.dtype == torch.int64
    assert is_undirected(edge_index) and bool((edge_index[0] != edge_index[1]).all())
    assert int(edge_index.max()) < n
    homophily = float((y[edge_index[0]] == y[edge_index[1]]).float().mean())
    assert homophily > 0.5 > 1 / k  # edges carry the classes
    score = nmi(y, KMeansClusterHead(k).fit_predict(x))
    assert 0.3 < score < 0.6  # features carry them too, but k-means alone is clearly imperfect
    other = get_dataset("csbm", seed=1)[0]
    assert not torch.equal(other, x)


def test_synthetic_faces_dataset():
    x, edge_index, y = get_dataset("synthetic-faces", n_samples=600, k=5)
    assert x.shape == (600, 256) and y.shape == (600,)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(600))
    assert is_undirected(edge_index)
    assert int(edge_index.min()) >= 0 and int(edge_index.max()) < 600
    assert bool((edge_index[0] != edge_index[1]).all())
    assert torch.bincount(edge_index[1], minlength=600).min() >= 5  # every node keeps its k neighbours
    assert float((y[edge_index[0]] == y[edge_index[1]]).float().mean()) > 0.5
    x2, edge_index2, _ = get_dataset("synthetic-faces", n_samples=600, k=5)
    assert torch.equal(x, x2) and torch.equal(edge_index, edge_index2)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'Corra'"):
        get_dataset("Corra")


def test_planetoid_offline_error_is_fast_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("AGC_RAY_CACHE", str(tmp_path))
    monkeypatch.setenv("AGC_RAY_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DatasetUnavailableError, match="not cached under") as info:
        get_dataset("Cora")
    assert time.monotonic() - start < 1.0
    assert str(tmp_path / "planetoid") in str(info.value)
    assert isinstance(info.value, ConnectionError)
    assert not (tmp_path / "planetoid" / "Cora").exists()


def test_planetoid_without_network_fails_within_the_timeout(tmp_path, monkeypatch):
    if can_reach(*PLANETOID_HOST, timeout=2.0):
        pytest.skip("the download host is reachable here: nothing offline to test")
    monkeypatch.setenv("AGC_RAY_CACHE", str(tmp_path))
    monkeypatch.delenv("AGC_RAY_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(DatasetUnavailableError, match="cannot be reached within 2 s"):
        get_dataset("PubMed", timeout=2.0)
    assert time.monotonic() - start < 3.0


def test_pyagc_packages_do_not_import_ray():
    code = (
        "import sys; import agc_ray.clusters, agc_ray.data, agc_ray.encoders, agc_ray.metrics, "
        "agc_ray.models; "
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
