"""``HiLander``: the scikit-learn-style estimator over the core functions.

>>> from agc_ray import HiLander
>>> model = HiLander(k=10, epochs=4).fit(X_train, y_train)
>>> levels = model.predict_hierarchy(X_test)   # finest level first
>>> model.save("model_dir"); HiLander.load("model_dir").predict(X_test)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.exceptions import NotFittedError

from agc_ray import __version__
from agc_ray.core.hierarchy import build_hierarchy, unsupervised_parents
from agc_ray.core.inference import DECODE_MODES, decode, score_level
from agc_ray.core.knn import METHODS, knn_graph
from agc_ray.core.lander import Lander
from agc_ray.core.train import ground_truth_graphs, to_train_graph, train_lander
from agc_ray.core.validation import check_param

log = logging.getLogger("agc_ray")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


def check_features(X, *, name: str = "X", min_rows: int = 1) -> np.ndarray:
    """Validate an (N, D) feature matrix and return it as float32. ValueError names the problem."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (n_samples, n_features), got shape {X.shape}")
    if X.shape[0] < min_rows:
        raise ValueError(f"{name} has {X.shape[0]} rows; at least {min_rows} required")
    if X.shape[1] < 1:
        raise ValueError(f"{name} has 0 features (shape {X.shape})")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    nonfinite, zero = invalid_rows(X)
    if nonfinite.size:
        raise ValueError(f"{name} contains NaN or Inf in {nonfinite.size} rows (first at row {nonfinite[0]})")
    if zero.size:
        raise ValueError(f"{name} has {zero.size} all-zero rows (first at row {zero[0]}): cosine similarity is undefined")
    return X


def invalid_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of an (N, D) matrix that cannot be embeddings: (rows with NaN/Inf, all-zero rows).

    Callers phrase the error their way (a row number here, an example id in the job's input checks).
    """
    nonfinite = np.flatnonzero(~np.isfinite(X).all(axis=1))
    zero = np.flatnonzero(~X.any(axis=1))
    return nonfinite, zero


def check_labels(y, n_rows: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D of shape (n_samples,), got shape {y.shape}")
    if y.shape[0] != n_rows:
        raise ValueError(f"X and y have different numbers of rows: {n_rows} vs {y.shape[0]}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if np.unique(y).size < 2:
        raise ValueError(f"y has a single class ({y[0]}); supervised training needs at least 2")
    return y.astype(np.int64)


def _check_param(name, value, kind, low=None, high=None, options=None):
    check_param(f"HiLander: {name}", value, kind, low, high, options)


class HiLander(ClusterMixin, BaseEstimator):
    """Hierarchical GNN clustering (Hi-LANDER, Xing et al., ICCV 2021) of embedding vectors.

    Args:
        k: neighbours per node in every level's kNN graph (not counting the node).
        tau: decode threshold on the edge probability ('prob') or similarity ('sim').
        levels: maximum number of hierarchy levels.
        epochs: training epochs over all ground-truth level graphs.
        seed: seed of kNN training samples, weight init and batch order.
        device: 'auto' (CUDA when torch sees a GPU), 'cpu' or 'cuda'.
        knn: 'auto' (exact up to 20K rows, IVF above), 'exact', 'ivf' or 'hnsw'.
        decode: 'prob' or 'sim' (see :func:`agc_ray.core.inference.decode`).
        early_stop: stop when a level adds more than 1/k of the previous level's edges.
        unsupervised: cluster without labels or a model (similarity density, 'sim' decode).
        conv: 'lander' (similarity-weighted mean conv) or 'gat'.
        hidden_channels, edge_channels, dropout: model sizes and raw-feature dropout.
        batch_size, lr, weight_decay: optimiser settings (AdamW, one-cycle cosine schedule).
        train_levels: levels of the ground-truth hierarchy used for training (the model is trained at
            this k only: its relational inputs are k-specific).
        conn_edges: train the linkage loss on 'all' edges or only on edges to 'denser' neighbours
            (the reference); density and decode use the denser ones either way.
        balance, focal_gamma: class-balanced and focal linkage loss.
        self_training: train the second half of the epochs also on the higher levels that the model
            itself builds from the training data (labels carried by peaks), which match what it sees
            at inference better than the ground-truth hierarchy does.

    Attributes:
        model_: the trained :class:`~agc_ray.core.lander.Lander` (None when unsupervised).
        n_features_in_: embedding dimension seen in ``fit``.
        history_: per-epoch training losses and times.
        stats_: per-level counts and timings of the last ``predict_hierarchy`` (kNN, model
            inference, decode).
    """

    def __init__(
        self,
        k: int = 10,
        tau: float = 0.9,
        levels: int = 10,
        epochs: int = 6,
        seed: int = 0,
        device: str = "auto",
        knn: str = "auto",
        decode: str = "prob",
        early_stop: bool = True,
        unsupervised: bool = False,
        conv: str = "lander",
        hidden_channels: int = 128,
        edge_channels: int = 128,
        dropout: float = 0.5,
        batch_size: int = 1024,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
        train_levels: int = 4,
        conn_edges: str = "all",
        balance: bool = True,
        focal_gamma: float = 0.0,
        self_training: bool = True,
    ):
        self.k = k
        self.tau = tau
        self.levels = levels
        self.epochs = epochs
        self.seed = seed
        self.device = device
        self.knn = knn
        self.decode = decode
        self.early_stop = early_stop
        self.unsupervised = unsupervised
        self.conv = conv
        self.hidden_channels = hidden_channels
        self.edge_channels = edge_channels
        self.dropout = dropout
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.train_levels = train_levels
        self.conn_edges = conn_edges
        self.balance = balance
        self.focal_gamma = focal_gamma
        self.self_training = self_training

    # -- validation ---------------------------------------------------------------------------
    def validate_params(self) -> None:
        """Check every hyper-parameter (ValueError naming the parameter, the value and the range)."""
        _check_param("k", self.k, int, 1)
        _check_param("levels", self.levels, int, 1)
        _check_param("epochs", self.epochs, int, 1)
        _check_param("seed", self.seed, int)
        _check_param("device", self.device, None, options=("auto", "cpu", "cuda"))
        _check_param("knn", self.knn, None, options=METHODS)
        _check_param("decode", self.decode, None, options=DECODE_MODES)
        _check_param("tau", self.tau, float, -1.0 if self.decode == "sim" or self.unsupervised else 0.0, 1.0)
        _check_param("conv", self.conv, None, options=("lander", "gat"))
        _check_param("hidden_channels", self.hidden_channels, int, 1)
        _check_param("edge_channels", self.edge_channels, int, 1)
        _check_param("dropout", self.dropout, float, 0.0, 0.99)
        _check_param("batch_size", self.batch_size, int, 1)
        _check_param("lr", self.lr, float, 1e-8)
        _check_param("weight_decay", self.weight_decay, float, 0.0)
        _check_param("train_levels", self.train_levels, int, 1)
        _check_param("conn_edges", self.conn_edges, None, options=("all", "denser"))
        _check_param("focal_gamma", self.focal_gamma, float, 0.0)

    def _torch_device(self) -> torch.device:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("HiLander: device='cuda' but torch sees no CUDA device")
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _check_fitted(self):
        if self.unsupervised:
            return
        if getattr(self, "model_", None) is None:
            raise NotFittedError("This HiLander instance is not fitted yet: call fit(X, y) or HiLander.load(path) first")

    # -- fit / predict ---------------------------------------------------------------------------
    def fit(self, X, y=None):
        """Train LANDER on labelled embeddings X (N, D) with integer classes y (N,). Returns self."""
        self.validate_params()
        X = check_features(X, min_rows=2)
        if self.unsupervised:
            self.n_features_in_ = X.shape[1]
            self.model_ = None
            self.history_ = []
            return self
        if y is None:
            raise ValueError("HiLander.fit needs labels y (or set unsupervised=True)")
        y = check_labels(y, X.shape[0])
        torch.manual_seed(self.seed)
        device = self._torch_device()
        t0 = time.perf_counter()
        graphs = ground_truth_graphs(X, y, ((self.k, self.train_levels),), knn_method=self.knn, seed=self.seed)
        model = Lander(
            X.shape[1], self.k, hidden_channels=self.hidden_channels, edge_channels=self.edge_channels,
            conv=self.conv, dropout=self.dropout,
        )
        train_kwargs = dict(
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, balance=self.balance,
            focal_gamma=self.focal_gamma, seed=self.seed, all_edges=self.conn_edges == "all", device=device,
        )
        first = max(1, self.epochs // 2) if self.self_training and self.epochs > 1 else self.epochs
        self.history_ = train_lander(model, graphs, epochs=first, **train_kwargs)
        if first < self.epochs:
            # Higher levels at inference are built from the model's own (imperfect) merges, which the
            # ground-truth hierarchy never shows: add the model's own levels of the training data.
            self.model_ = model.cpu().eval()
            own = self.own_levels(X, y)
            log.info("self-training: %d more level graphs (%s nodes)", len(own), [g.n for g in own])
            self.history_ += train_lander(
                model, graphs + own, epochs=self.epochs - first, refit_normalization=False, **train_kwargs
            )
        self.model_ = model.cpu().eval()
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def own_levels(self, X, y) -> list:
        """Training graphs of the higher levels this model builds from labelled X (labels carried by
        peaks): what the second half of ``fit`` adds to the ground-truth hierarchy."""
        collected, self._inference_seconds = [], []
        build_hierarchy(
            X, self._decode_level, k=self.k, levels=self.train_levels, early_stop=False, labels=y,
            knn=lambda feats: knn_graph(feats, self.k, method=self.knn, seed=self.seed, normalize=False),
            on_level=lambda level, g: collected.append(to_train_graph(g, self.k, level)) if level > 0 else None,
        )
        return collected

    def _decode_level(self, g, level):
        if self.unsupervised:
            return unsupervised_parents(g, self.tau)
        t0 = time.perf_counter()
        p, density = score_level(self.model_, g, device=self._torch_device())
        self._inference_seconds.append(time.perf_counter() - t0)
        return decode(p, density, g.nbr, g.sim, tau=self.tau, mode=self.decode)

    def predict_hierarchy(self, X) -> list[np.ndarray]:
        """Cluster X (N, D): every level's (N,) int64 labels, finest first, each coarsening the last."""
        self.validate_params()
        self._check_fitted()
        X = check_features(X)
        if getattr(self, "n_features_in_", None) is not None and X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but HiLander was fitted with {self.n_features_in_} features"
            )
        torch.manual_seed(self.seed)
        self.stats_, self._inference_seconds = [], []
        levels = build_hierarchy(
            X,
            self._decode_level,
            k=self.k,
            levels=self.levels,
            early_stop=self.early_stop,
            knn=lambda feats: knn_graph(feats, self.k, method=self.knn, seed=self.seed, normalize=False),
            stats=self.stats_,
        )
        for level_stats, seconds in zip(self.stats_, self._inference_seconds):
            level_stats["inference_seconds"] = seconds
        return levels

    def predict(self, X) -> np.ndarray:
        """The final (coarsest) level's (N,) int64 labels."""
        return self.predict_hierarchy(X)[-1]

    def fit_predict(self, X, y=None, **kwargs):
        return self.fit(X, y).predict(X)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write ``path/config.json`` (parameters, dimension, history) and ``path/weights.pt``."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        params = self.get_params()
        config = {
            "format": "agc_ray.HiLander",
            "agc_ray_version": __version__,
            "params": params,
            "n_features_in": getattr(self, "n_features_in_", None),
            "history": getattr(self, "history_", []),
        }
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        if self.model_ is not None:
            torch.save(self.model_.state_dict(), path / WEIGHTS_FILE)
        os.replace(tmp, path / CONFIG_FILE)
        return path

    @classmethod
    def load(cls, path) -> "HiLander":
        """Load a directory written by :meth:`save` (weights loaded with ``weights_only=True``)."""
        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise ValueError(f"{path} is not a HiLander model directory: {CONFIG_FILE} not found")
        try:
            config = json.loads(cfg_file.read_text())
            params = config["params"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{cfg_file} is not a valid HiLander config: {e}") from e
        est = cls(**params)
        est.n_features_in_ = config.get("n_features_in")
        est.history_ = config.get("history", [])
        est.model_ = None
        if not est.unsupervised:
            weights = path / WEIGHTS_FILE
            if not weights.is_file():
                raise ValueError(f"{path}: {WEIGHTS_FILE} not found")
            model = Lander(
                est.n_features_in_, est.k, hidden_channels=est.hidden_channels,
                edge_channels=est.edge_channels, conv=est.conv, dropout=est.dropout,
            )
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            est.model_ = model.eval()
        return est
