"""PyAGC-compatible attributed graph clustering: user heads and models, built-ins, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.utils import is_undirected

from agc_ray.clusters import BaseClusterHead, DECClusterHead, DMoNClusterHead, KMeansClusterHead
from agc_ray.data import make_csbm
from agc_ray.encoders import GAT, GCN, MLP, GraphSAGE
from agc_ray.metrics import acc, modularity, nmi
from agc_ray.models import DEC, ClusteringModel, DMoN, fit

N_CLASSES = 3


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Small graphs: one intra-op thread is as fast, and avoids OpenMP spin-waiting that makes
    # multi-threaded torch ~100x slower when other processes keep the 2 cores busy.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def graph() -> Data:
    x, edge_index, y = make_csbm(n_nodes=300, n_classes=N_CLASSES, n_features=16, avg_degree=8, seed=0)
    return Data(x=x, edge_index=edge_index, y=y)


def _assert_trains(losses: list[float], epochs: int) -> None:
    assert len(losses) == epochs
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def _assert_assignments(model: ClusteringModel, data: Data, k: int) -> None:
    labels = model.infer_full(data)
    assert labels.shape == (data.num_nodes,) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < k
    proba = model.infer_full(data, soft=True)
    assert proba.shape == (data.num_nodes, k)
    assert bool((proba >= 0).all())
    torch.testing.assert_close(proba.sum(dim=1), torch.ones(data.num_nodes))
    assert torch.equal(proba.argmax(dim=1), labels)


# --- user-defined heads, as in PyAGC's custom cluster head tutorial --------------------------------


class CentroidHead(BaseClusterHead):
    """forward(z): mean distance to the nearest learnable centre."""

    def __init__(self, n_clusters, n_features):
        super().__init__()
        self.centers = torch.nn.Parameter(torch.randn(n_clusters, n_features))
        self.seen = []

    def forward(self, z):
        self.seen.append(z.shape)
        return torch.cdist(z, self.centers).min(dim=1).values.mean()

    @torch.no_grad()
    def cluster(self, z, soft=False):
        dist = torch.cdist(z, self.centers)
        return (-dist).softmax(dim=-1) if soft else dist.argmin(dim=-1)


class GraphAwareHead(BaseClusterHead):
    """forward(z, edge_index): centre distance plus disagreement across edges."""

    def __init__(self, n_clusters, n_features):
        super().__init__()
        self.centers = torch.nn.Parameter(torch.randn(n_clusters, n_features))
        self.edges_seen = []

    def forward(self, z, edge_index):
        self.edges_seen.append(edge_index)
        s = (z @ self.centers.t()).softmax(dim=-1)
        src, dst = edge_index
        return torch.cdist(z, self.centers).min(dim=1).values.mean() - (s[src] * s[dst]).sum(1).mean()

    @torch.no_grad()
    def cluster(self, z, soft=False):
        s = (z @ self.centers.t()).softmax(dim=-1)
        return s if soft else s.argmax(dim=-1)


def _dmon(graph, hidden=16):
    torch.manual_seed(0)
    return DMoN(GCN(graph.num_features, hidden, 2), n_features=hidden, n_clusters=N_CLASSES)


def test_user_head_forward_z_dropped_into_dmon(graph):
    model = _dmon(graph)
    head = CentroidHead(N_CLASSES, 16)
    model.cluster_head = head
    losses = fit(model, graph, epochs=25, lr=1e-2, progress=False)
    _assert_trains(losses, 25)
    assert len(head.seen) == 25 and head.seen[0] == (graph.num_nodes, 16)  # called with z only
    _assert_assignments(model, graph, N_CLASSES)
    assert torch.equal(head.predict(model.embed(graph)), head.cluster(model.embed(graph)))


def test_user_head_forward_z_edge_index_dropped_into_dmon(graph):
    model = _dmon(graph)
    model.cluster_head = GraphAwareHead(N_CLASSES, 16)
    losses = fit(model, graph, epochs=25, lr=1e-2, progress=False)
    _assert_trains(losses, 25)
    assert all(torch.equal(e, graph.edge_index) for e in model.cluster_head.edges_seen)
    _assert_assignments(model, graph, N_CLASSES)


def test_heads_asking_for_adjacency_or_graph_get_them(graph):
    got = {}

    class AdjHead(CentroidHead):
        def forward(self, z, adj, graph, num_nodes, unknown_optional=7):
            got.update(adj=adj, graph=graph, num_nodes=num_nodes, unknown_optional=unknown_optional)
            return super().forward(z)

    model = _dmon(graph)
    model.cluster_head = AdjHead(N_CLASSES, 16)
    loss = model(graph)
    assert loss.dim() == 0 and torch.isfinite(loss)
    adj = got["adj"]
    assert adj.is_sparse and adj.shape == (graph.num_nodes, graph.num_nodes)
    assert int(adj._nnz()) == graph.edge_index.shape[1]
    assert got["graph"] is graph and got["num_nodes"] == graph.num_nodes and got["unknown_optional"] == 7


def test_head_with_unsuppliable_argument_is_a_value_error(graph):
    class NeedsLabels(CentroidHead):
        def forward(self, z, labels):
            return super().forward(z)

    model = _dmon(graph)
    model.cluster_head = NeedsLabels(N_CLASSES, 16)
    with pytest.raises(ValueError, match="'labels'"):
        model(graph)


def test_user_defined_clustering_model_subclass(graph):
    class MyClusteringModel(ClusteringModel):
        def __init__(self, encoder, cluster_head):
            super().__init__()
            self.encoder = encoder
            self.cluster_head = cluster_head

        def forward(self, data):
            z = self.encoder(data.x, data.edge_index)
            return self.cluster_head(z, data.edge_index)

        def infer_full(self, data):
            z = self.encoder(data.x, data.edge_index)
            return self.cluster_head.cluster(z, soft=False)

    torch.manual_seed(0)
    model = MyClusteringModel(GCN(graph.num_features, 16, 1), DMoNClusterHead(N_CLASSES, 16))
    losses = fit(model, graph, epochs=30, lr=1e-2, progress=False)
    _assert_trains(losses, 30)
    labels = model.infer_full(graph)
    assert labels.shape == (graph.num_nodes,) and labels.dtype == torch.int64
    # the base class's embed works for the subclass, too
    assert model.embed(graph).shape == (graph.num_nodes, 16)


def test_subclass_keeping_the_default_forward_dispatches_by_signature(graph):
    class Plain(ClusteringModel):
        def __init__(self):
            super().__init__()
            self.encoder = MLP(graph.num_features, 8, 2)
            self.cluster_head = CentroidHead(2, 8)

    model = Plain()
    _assert_trains(fit(model, (graph.x, graph.edge_index), epochs=20, lr=1e-2, progress=False), 20)
    _assert_assignments(model, graph, 2)


def test_subclass_passing_its_parts_to_the_base_gets_its_checks(graph):
    class Passed(ClusteringModel):
        def __init__(self, n_clusters, n_features=8):
            super().__init__(MLP(graph.num_features, 8, 2), n_features, n_clusters)
            self.cluster_head = CentroidHead(n_clusters, 8)

    model = Passed(3)
    assert (model.n_clusters, model.n_features) == (3, 8)
    _assert_assignments(model, graph, 3)
    with pytest.raises(ValueError, match="Passed: n_clusters must be >= 1, got 0"):
        Passed(0)
    with pytest.raises(ValueError, match="returns 8 features but Passed was built with n_features=5"):
        Passed(3, n_features=5).embed(graph)


# --- built-in models ----------------------------------------------------------------------------------


def test_dmon_and_dec_beat_kmeans_on_raw_features():
    x, edge_index, y = make_csbm(n_nodes=600, n_classes=4, n_features=32, seed=1)
    data = Data(x=x, edge_index=edge_index)
    base = nmi(y, KMeansClusterHead(4).fit_predict(x))
    torch.manual_seed(0)
    dmon = DMoN(GCN(32, 32, 2), 32, 4)
    _assert_trains(fit(dmon, data, epochs=80, lr=1e-2, progress=False), 80)
    torch.manual_seed(0)
    dec = DEC(GCN(32, 32, 2, out_channels=16), 16, 4)
    dec_losses = fit(dec, data, epochs=80, lr=5e-3, progress=False)
    assert all(np.isfinite(dec_losses)) and bool(dec.cluster_head.initialized)
    for model in (dmon, dec):
        _assert_assignments(model, data, 4)
        assert nmi(y, model.infer_full(data)) > base + 0.15, (type(model).__name__, base)


def test_dec_pretrain_initialises_centres(graph):
    torch.manual_seed(0)
    model = DEC(GCN(graph.num_features, 16, 2), 16, N_CLASSES)
    assert not bool(model.cluster_head.initialized)
    losses = model.pretrain(graph, epochs=15)
    assert len(losses) == 15 and all(np.isfinite(losses))
    assert bool(model.cluster_head.initialized)
    # centres are the k-means centres of the embeddings: every cluster is used
    assert model.infer_full(graph).unique().numel() == N_CLASSES


def test_kmeans_head_swapped_into_a_trained_model(graph):
    model = _dmon(graph)
    fit(model, graph, epochs=10, lr=1e-2, progress=False)
    model.cluster_head = KMeansClusterHead(N_CLASSES)
    _assert_assignments(model, graph, N_CLASSES)
    assert model.cluster_head.cluster_centers.shape == (N_CLASSES, 16)


# --- built-in heads -----------------------------------------------------------------------------------


def _blobs(n_per=40, k=3, f=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(k, f) * 10
    y = torch.arange(k).repeat_interleave(n_per)
    return centres[y] + 0.3 * torch.randn(k * n_per, f, generator=g), y


def test_dec_head_contract_and_initialisation():
    z, y = _blobs()
    head = DECClusterHead(n_clusters=3, n_features=5)
    assert head.cluster_centers.shape == (3, 5) and not bool(head.initialized)
    loss = head(z)
    assert loss.dim() == 0 and float(loss.detach()) > 0
    assert bool(head.initialized)  # k-means on the first batch it saw
    assert acc(y, head.cluster(z)) == 1.0
    soft = head.predict(z, soft=True)
    assert soft.shape == (120, 3)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(120))
    loss.backward()
    assert head.cluster_centers.grad is not None and torch.isfinite(head.cluster_centers.grad).all()
    new = torch.randn(3, 5)
    head.reset_cluster_centers(new)
    torch.testing.assert_close(head.cluster_centers.data, new)
    with pytest.raises(ValueError, match=r"centers must have shape \(3, 5\)"):
        head.reset_cluster_centers(torch.randn(4, 5))
    with pytest.raises(ValueError, match="n_features=5"):
        head(torch.randn(10, 6))


def test_dmon_head_spectral_loss_is_minus_modularity_for_hard_assignments():
    # two triangles joined by one edge; z one-hot per triangle, logits scaled to near one-hot S
    und = torch.tensor([[0, 0, 1, 3, 3, 4, 2], [1, 2, 2, 4, 5, 5, 3]])
    edge_index = torch.cat([und, und.flip(0)], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    z = torch.nn.functional.one_hot(labels, 2).float()
    head = DMoNClusterHead(2, 2, lam=0.0)
    with torch.no_grad():
        head.cluster_centers.copy_(torch.eye(2) * 60)
    with torch.no_grad():
        spectral, collapse = head.losses(z, edge_index)
    q = modularity(edge_index, labels)
    assert q == pytest.approx(6 / 7 - 0.5)
    assert float(spectral) == pytest.approx(-q, abs=1e-5)
    assert float(collapse) == pytest.approx(0.0, abs=1e-5)  # balanced clusters: no collapse penalty
    assert float(head(z, edge_index).detach()) == pytest.approx(-q, abs=1e-5)
    assert torch.equal(head.cluster(z), labels)


def test_dmon_head_alone_recovers_two_communities():
    torch.manual_seed(0)
    und = torch.tensor([[0, 0, 1, 3, 3, 4, 2], [1, 2, 2, 4, 5, 5, 3]])
    edge_index = torch.cat([und, und.flip(0)], dim=1)
    z = torch.eye(6)
    head = DMoNClusterHead(2, 6)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = head(z, edge_index)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert acc(torch.tensor([0, 0, 0, 1, 1, 1]), head.cluster(z)) == 1.0


def test_kmeans_head():
    z, y = _blobs(k=4)
    head = KMeansClusterHead(n_clusters=4)
    assert torch.equal(head.cluster(z), head.fit_predict(z))  # cluster() on an unfitted head fits first
    assert acc(y, head.fit_predict(z)) == 1.0
    zz = z.clone().requires_grad_(True)
    inertia = head(zz)
    assert inertia.dim() == 0 and 0 < float(inertia.detach()) < 5 * 0.3**2 * 5
    inertia.backward()
    assert zz.grad is not None
    soft = head.cluster(z, soft=True)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(len(z)))
    assert acc(y, KMeansClusterHead(4, backend="sklearn").fit_predict(z)) == 1.0
    with pytest.raises(ValueError, match="backend"):
        KMeansClusterHead(4, backend="cuml")


# --- encoders -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GCN, GAT, GraphSAGE, MLP])
def test_encoders_pyg_signature(cls, graph):
    torch.manual_seed(0)
    enc = cls(graph.num_features, 12, 2)
    z = enc(graph.x, graph.edge_index)
    assert z.shape == (graph.num_nodes, 12) and torch.isfinite(z).all()
    model = DMoN(enc, 12, N_CLASSES)
    assert model(graph).dim() == 0


def test_mlp_ignores_the_edges(graph):
    enc = MLP(graph.num_features, 8, 2)
    assert torch.equal(enc(graph.x, graph.edge_index), enc(graph.x, graph.edge_index[:, :5]))
    assert torch.equal(enc(graph.x, graph.edge_index), enc(graph.x))


# --- bad input ----------------------------------------------------------------------------------------


class WrongShapeHead(CentroidHead):
    def __init__(self, out):
        super().__init__(N_CLASSES, 16)
        self.out = out

    @torch.no_grad()
    def cluster(self, z, soft=False):
        return self.out(z)


@pytest.mark.parametrize(
    "out, soft, message",
    [
        (lambda z: torch.zeros(z.shape[0] - 1, dtype=torch.long), False, r"labels of shape \(300,\)"),
        (lambda z: torch.zeros(z.shape[0], N_CLASSES, dtype=torch.long), False, r"labels of shape \(300,\)"),
        (lambda z: torch.zeros(z.shape[0]), False, "integer labels"),
        (lambda z: torch.full((z.shape[0],), 7), False, "n_clusters=3"),
        (lambda z: torch.zeros(z.shape[0], dtype=torch.long), True, r"probabilities of shape \(300, 3\)"),
        (lambda z: torch.full((z.shape[0], N_CLASSES), 0.5), True, "sum to 1"),
    ],
)
def test_head_whose_cluster_returns_the_wrong_shape(graph, out, soft, message):
    model = _dmon(graph)
    model.cluster_head = WrongShapeHead(out)
    with pytest.raises(ValueError, match=message):
        model.infer_full(graph, soft=soft)


def test_head_returning_a_non_scalar_loss(graph):
    class VectorLoss(CentroidHead):
        def forward(self, z):
            return torch.cdist(z, self.centers).min(dim=1).values

    model = _dmon(graph)
    model.cluster_head = VectorLoss(N_CLASSES, 16)
    with pytest.raises(ValueError, match="scalar loss"):
        model(graph)


def test_head_returning_a_tuple_of_losses_like_pyagc_dmon(graph):
    class TupleHead(DMoNClusterHead):
        def forward(self, z, edge_index):
            return self.losses(z, edge_index)  # (spectral, collapse), as PyAGC's DMoN head returns

    model = _dmon(graph)
    model.cluster_head = TupleHead(N_CLASSES, 16)
    spectral, collapse = model.cluster_head.losses(model.embed(graph), graph.edge_index)
    assert float(model(graph).detach()) == pytest.approx(float((spectral + collapse).detach()), abs=1e-6)


@pytest.mark.parametrize("bad", [300, -1])
def test_edge_index_out_of_range(graph, bad):
    edge_index = graph.edge_index.clone()
    edge_index[1, 5] = bad
    data = Data(x=graph.x, edge_index=edge_index)
    model = _dmon(graph)
    with pytest.raises(ValueError, match=r"out of range \[0, 300\).*column 5"):
        model(data)
    with pytest.raises(ValueError, match="out of range"):
        fit(model, data, epochs=1, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        modularity(edge_index, graph.y)


def test_x_with_nan(graph):
    x = graph.x.clone()
    x[4, 2] = float("nan")
    model = _dmon(graph)
    with pytest.raises(ValueError, match=r"x has 1 NaN .*row 4"):
        model(Data(x=x, edge_index=graph.edge_index))
    with pytest.raises(ValueError, match="NaN"):
        model.infer_full((x, graph.edge_index))
    with pytest.raises(ValueError, match="NaN"):
        KMeansClusterHead(3).fit(x)


def test_n_clusters_larger_than_n(graph):
    model = DMoN(GCN(graph.num_features, 16, 1), 16, n_clusters=301)
    with pytest.raises(ValueError, match="n_clusters=301 is larger than the number of nodes N=300"):
        model(graph)
    z = torch.randn(10, 4)
    with pytest.raises(ValueError, match="n_clusters=11 is larger than the number of nodes N=10"):
        KMeansClusterHead(11).fit(z)
    with pytest.raises(ValueError, match="larger than the number of nodes"):
        DECClusterHead(11, 4)(z)
    with pytest.raises(ValueError, match="larger than the number of nodes"):
        DMoNClusterHead(11, 4)(z, torch.tensor([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        DMoN(GCN(4, 4, 1), 4, n_clusters=0)


def test_encoder_width_must_match_n_features(graph):
    model = DMoN(GCN(graph.num_features, 16, 1), n_features=32, n_clusters=N_CLASSES)
    with pytest.raises(ValueError, match="returns 16 features but DMoN was built with n_features=32"):
        model(graph)


def test_fit_arguments_and_divergence(graph):
    model = _dmon(graph)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, graph, epochs=-1)
    with pytest.raises(ValueError, match="lr"):
        fit(model, graph, epochs=1, lr=0)

    class NaNHead(CentroidHead):
        def forward(self, z):
            return super().forward(z) * float("nan")

    model.cluster_head = NaNHead(N_CLASSES, 16)
    with pytest.raises(FloatingPointError, match="epoch 1"):
        fit(model, graph, epochs=3, progress=False)


def test_csbm_is_undirected_and_deterministic(graph):
    assert is_undirected(graph.edge_index)
    assert bool((graph.edge_index[0] != graph.edge_index[1]).all())
    again = make_csbm(n_nodes=300, n_classes=N_CLASSES, n_features=16, avg_degree=8, seed=0)
    assert torch.equal(again[0], graph.x) and torch.equal(again[1], graph.edge_index)
