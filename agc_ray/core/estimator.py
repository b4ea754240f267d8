"""``HiLander``: the scikit-learn-style estimator over the core functions.

>>> from agc_ray import HiLander
>>> model = HiLander(k=10, epochs=4).fit(X_train, y_train)
>>> levels = model.predict_hierarchy(X_test)   # finest level first
>>> result = model.hierarchy(X_test)            # the same levels, per-level stats, the selected level
>>> model.save("model_dir"); HiLander.load("model_dir").predict(X_test)
"""

from __future__ import annotations

import json
import logging
import os
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import validate_data

from agc_ray.core.boundary import BoundaryRule
from agc_ray.core.calibration import holdout_classes, select_levels
from agc_ray.core.graph import N_EDGE_FEATURES
from agc_ray.core.hierarchy import build_hierarchy
from agc_ray.core.inference import Hierarchy, LevelDecoder, decode, score_level
from agc_ray.core.knn import knn_graph
from agc_ray.core.lander import Lander
from agc_ray.core.params import DEFAULTS as D
from agc_ray.core.params import PARAMS, check_params
from agc_ray.core.recall import ivf_missed
from agc_ray.core.train import (
    deterministic_training, ground_truth_graphs, self_training_graphs, to_train_graph, train_lander, training_phases,
    training_tables,
)
from agc_ray.core.validation import check_labels, check_rows

log = logging.getLogger("agc_ray")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
#: Per-level tau of a supervised model without a validation choice: level 0, level 1, then every level
#: above. Level 0 is decoded conservatively and leaves an identity in several fragments; level 1 joins
#: them, where same-identity edges get probabilities spread over 0.05-1.0 (heavy-tailed identities:
#: median 0.49, different-identity edges' 90th percentile 0.15); above it the nodes are mostly whole
#: identities and most edges left lead to other ones (to denser neighbours: 10 % same-identity at level
#: 2 vs 20 % at level 1), so only near-certain ones are taken. Measured on the regime suite (13 cases,
#: 3 seeds, 20K rows), Fp of the returned level against (0.9, 0.6 at every level above): higher on 10
#: cases (dim128 +1.1, wide +1.9, distractors +2.2, returned level = best level everywhere); heavy
#: tail -0.6, the other generator -0.1, the size60 -> size5 transfer -2.4 (0.4 at level 1 gained up to 5
#: points more elsewhere but lost 6.5 on the transfer, whose level 1 then over-merged).
DEFAULT_TAUS = (0.9, 0.5, 0.95)
#: tau at every level of a model directory saved before DEFAULT_TAUS (trained class-balanced throughout).
LEGACY_TAU = 0.9
#: Level budget when neither the user nor the validation pass sets one.
DEFAULT_LEVELS = 10
#: Level budget of the unsupervised mode's adaptive thresholds when the user sets none: its selected
#: level (usually level 3: one step below tau_0, then one by average linkage) and two coarser options,
#: each a step further towards chance (tau_0 - chance down to 0.85^4 = 0.52 of it). The next step
#: mostly merged unrelated clusters (of the pairs level 6 added on 12 regimes at 20K rows, 4-14 % were
#: of one class; 50 % on another generator's stretched clusters), and each level costs a kNN graph of
#: its nodes (1M rows: 5-10 s).
ADAPTIVE_LEVELS = 6


def _package_version() -> str:
    try:
        return metadata.version("agc_ray")
    except metadata.PackageNotFoundError:  # a source checkout on the path, not installed
        return "unknown"


class HiLander(BaseEstimator):
    """Hierarchical GNN clustering (Hi-LANDER, Xing et al., ICCV 2021) of embedding vectors.

    Parameters are declared once in :data:`agc_ray.core.params.PARAMS` (defaults, ranges, the jobs'
    help); what each does:

    Args:
        k: neighbours per node in every level's kNN graph (not counting the node).
        tau: decode threshold on the edge probability ('prob') or similarity ('sim') at every level.
            None (default): supervised, the per-level thresholds chosen on the validation identities
            in ``fit`` (``taus_``) or :data:`DEFAULT_TAUS` (0.9 at level 0, 0.5 at level 1, 0.95 above) without validation; unsupervised, the table's own
            thresholds (:class:`~agc_ray.core.hierarchy.AdaptiveSchedule`, set up at level 0).
        levels: maximum number of hierarchy levels. None (default): the number chosen on validation
            (``n_levels_``: the last level that still improved the held-out score), else 10.
        epochs: training epochs over all ground-truth level graphs.
        seed: seed of kNN training samples, weight init and batch order.
        device: 'auto' (CUDA when torch sees a GPU), 'cpu' or 'cuda'.
        knn: 'auto' (exact up to 20K rows, IVF above), 'exact', 'ivf' or 'hnsw'.
        knn_recall: recall@k target of the IVF search (on CPU the margin of cells each row probes, on GPU
            the cells probed, raised until a seeded sample's recall against exact search reaches it, at
            every IVF level); None: a fixed 16 probes.
        decode: 'prob' or 'sim' (see :func:`agc_ray.core.inference.decode`).
        early_stop: stop when a level adds more than 1/k of the previous level's edges (at a fixed
            threshold; the unsupervised mode's adaptive thresholds fall level by level and go on to the
            level budget, see :meth:`stops_early`).
        boundary_closeness: above level 0, a level's clusters whose boundary in the level-0 kNN graph is
            this close to their insides (mean edge similarity across it against inside them, both from
            the table's chance similarity) merge too: fragments of one stretched cluster, which the
            decode sees through far-apart peaks and means (see :mod:`agc_ray.core.boundary`); None: off.
        unsupervised: cluster without labels or a model (similarity density, 'sim' decode); ``fit(X)``
            clusters X (``labels_``) and ``predict`` needs no fit.
        conv: 'lander' (similarity-weighted mean conv) or 'gat'.
        hidden_channels, edge_channels, dropout: model sizes and raw-feature dropout.
        batch_size, lr, weight_decay: optimiser settings (AdamW, one-cycle cosine schedule).
        train_levels: hierarchy levels trained on: levels 0 and 1 of the ground-truth hierarchy (its
            levels above are degenerate, see :data:`~agc_ray.core.train.GROUND_TRUTH_LEVELS`) and,
            with ``self_training``, the model's own levels 1 to ``train_levels - 1``. The model is
            trained at this k only: its relational inputs are k-specific.
        conn_edges: train the linkage loss on 'all' edges or only on edges to 'denser' neighbours
            (the reference); density and decode use the denser ones either way.
        balance, focal_gamma: class-balanced (at level 0; the levels above are trained on their own
            share of same-class edges, see DEFAULT_TAUS) and focal linkage loss.
        self_training: train the second half of the epochs also on the higher levels that the model
            itself builds from the training data (labels carried by peaks), which match what it sees
            at inference better than the ground-truth hierarchy does.
        subsample_identities: train also on a seeded copy of the training rows in which each identity
            keeps a random share of its rows (:func:`~agc_ray.core.train.subsampled_identities`), both
            phases: the model meets smaller identities, fragments and more crowded neighbourhoods than
            its training table holds (tables of other identity sizes, see README's Quality).
        validation_fraction: share of the training classes (whole identities) held out of training
            to choose each level's tau and the number of levels (0: no validation, :data:`DEFAULT_TAUS`).

    Attributes:
        model_: the trained :class:`~agc_ray.core.lander.Lander` (None when unsupervised).
        n_features_in_: embedding dimension seen in ``fit``.
        history_: per-epoch training losses and times.
        taus_: per-level decode thresholds chosen on validation (None without validation).
        n_levels_: number of levels chosen on validation (None without validation).
        validation_: the validation pass: rows, per-level tau / Fp / Fb / clusters, seconds.
        labels_: unsupervised, the labels ``fit(X)`` gave X (the selected level).

    ``predict`` and ``predict_hierarchy`` leave the estimator unchanged; :meth:`hierarchy` returns
    the per-level stats and the selected level with the labels.
    """

    def __init__(
        self,
        k: int = D.k,
        tau: float | None = D.tau,
        levels: int | None = D.levels,
        epochs: int = D.epochs,
        seed: int = D.seed,
        device: str = D.device,
        knn: str = D.knn,
        knn_recall: float | None = D.knn_recall,
        decode: str = D.decode,
        early_stop: bool = D.early_stop,
        boundary_closeness: float | None = D.boundary_closeness,
        unsupervised: bool = D.unsupervised,
        conv: str = D.conv,
        hidden_channels: int = D.hidden_channels,
        edge_channels: int = D.edge_channels,
        dropout: float = D.dropout,
        batch_size: int = D.batch_size,
        lr: float = D.lr,
        weight_decay: float = D.weight_decay,
        train_levels: int = D.train_levels,
        conn_edges: str = D.conn_edges,
        balance: bool = D.balance,
        focal_gamma: float = D.focal_gamma,
        self_training: bool = D.self_training,
        subsample_identities: bool = D.subsample_identities,
        validation_fraction: float = D.validation_fraction,
    ):
        self.k = k
        self.tau = tau
        self.levels = levels
        self.epochs = epochs
        self.seed = seed
        self.device = device
        self.knn = knn
        self.knn_recall = knn_recall
        self.decode = decode
        self.early_stop = early_stop
        self.boundary_closeness = boundary_closeness
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
        self.subsample_identities = subsample_identities
        self.validation_fraction = validation_fraction

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Unsupervised, the model is the table's own similarities: predict needs no fit and no labels.
        tags.requires_fit = not self.unsupervised
        tags.target_tags.required = not self.unsupervised
        # scikit-learn's "clusterer" is an unsupervised predictor (its checks fit one without labels, and
        # ClusterMixin would declare both modes one); supervised, HiLander learns from labelled identities
        tags.estimator_type = "clusterer" if self.unsupervised else None
        return tags

    # -- validation ---------------------------------------------------------------------------
    def validate_params(self) -> None:
        """Check every hyper-parameter (ValueError naming the parameter, the value and the range)."""
        check_params({name: getattr(self, name) for name in PARAMS}, lambda name: f"HiLander: {name}")

    def _validate_X(self, X, *, reset: bool) -> np.ndarray:
        """X as a float32 (N, D) array checked as scikit-learn checks it (2-D, dense, real, not empty,
        the fitted feature count unless ``reset``), then per row (NaN/Inf, all-zero)."""
        min_rows = 2 if reset and not self.unsupervised else 1
        X = validate_data(self, X, reset=reset, dtype=np.float32, order="C", ensure_all_finite=False,
                          ensure_min_samples=min_rows)
        return check_rows(X)

    # -- decode settings per level ------------------------------------------------------------------
    def level_tau(self, level: int) -> float | None:
        """Decode threshold of hierarchy level ``level``.

        The user's ``tau`` when set; else the validation's choice for that level (the top one's above
        it); else :meth:`default_taus`; None in unsupervised mode, where each level derives its
        threshold from its own similarities.
        """
        if self.tau is not None:
            return float(self.tau)
        if self.unsupervised:
            return None
        taus = getattr(self, "taus_", None) or self.default_taus()
        return float(taus[min(level, len(taus) - 1)])

    def uses_adaptive_thresholds(self) -> bool:
        """Whether each level's threshold comes from the table (unsupervised without a user's tau, see
        :class:`~agc_ray.core.hierarchy.AdaptiveSchedule`)."""
        return self.unsupervised and self.tau is None

    def stops_early(self) -> bool:
        """Whether the early-stop rules apply to this estimator's hierarchy: ``early_stop``, except
        with the unsupervised mode's adaptive thresholds. The reference's ratio compares levels decoded
        at one threshold; the schedule lowers it level by level, so every level merges a fraction of
        the last one's nodes and the ratio stopped each table after level 2 (20K rows of 12 regimes:
        1341 -> 1212 -> 1129 clusters, a hierarchy with nothing coarser than what was then its selected
        level). The level budget (:data:`ADAPTIVE_LEVELS`) ends it instead."""
        return self.early_stop and not self.uses_adaptive_thresholds()

    def default_taus(self) -> list[float]:
        """Per-level taus without a user's or the validation's choice (the last one for every level
        above): :data:`DEFAULT_TAUS`, or :data:`LEGACY_TAU` for a directory saved before them."""
        return list(getattr(self, "default_taus_", DEFAULT_TAUS))

    def max_levels(self) -> int:
        """The level budget: the user's ``levels``, else the validation's ``n_levels_``, else 10 (the
        unsupervised mode's adaptive thresholds: :data:`ADAPTIVE_LEVELS`)."""
        if self.levels is not None:
            return int(self.levels)
        if self.uses_adaptive_thresholds():
            return ADAPTIVE_LEVELS
        return int(getattr(self, "n_levels_", None) or DEFAULT_LEVELS)

    def level_decoder(self, tau: float | None = None) -> LevelDecoder:
        """A decoder for the levels of one hierarchy run (see :class:`LevelDecoder`)."""
        return LevelDecoder(self, tau)

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

    # -- the model ---------------------------------------------------------------------------------
    def new_model(self, n_features: int, n_edge_features: int = N_EDGE_FEATURES) -> Lander:
        """An untrained :class:`~agc_ray.core.lander.Lander` of this estimator's sizes for
        ``n_features``-dimensional embeddings (the one place a Lander is built); ``n_edge_features``:
        fewer for weights saved before the last edge features were added."""
        return Lander(n_features, self.k, hidden_channels=self.hidden_channels, edge_channels=self.edge_channels,
                      conv=self.conv, dropout=self.dropout, n_edge_features=n_edge_features)

    @classmethod
    def from_weights(cls, state_dict: dict, n_features_in: int, *, history=(), **params) -> "HiLander":
        """A fitted estimator of ``params`` around trained weights (a Lander state dict), as the
        training job's workers and model writer build it; the weights are copied."""
        est = cls(**params)
        # The edge features a model reads are its standardisation's: ten in weights saved before the
        # member-cohesion features.
        model = est.new_model(n_features_in, n_edge_features=int(state_dict["feat_mean"].numel()))
        model.load_state_dict(state_dict)
        est.model_, est.n_features_in_, est.history_ = model.eval(), n_features_in, list(history)
        return est

    # -- fit / predict ---------------------------------------------------------------------------
    def fit(self, X, y=None):
        """Train LANDER on labelled embeddings X (N, D) with class labels y (N,). Returns self.

        With ``validation_fraction`` > 0 a seeded share of the classes is held out of training and
        used to choose each level's tau and the number of levels (``taus_``, ``n_levels_``).
        Unsupervised, there is nothing to train: ``fit(X)`` clusters X (``labels_``).
        """
        self.validate_params()
        X = self._validate_X(X, reset=True)
        self.taus_, self.n_levels_, self.validation_ = None, None, None
        self.default_taus_ = list(DEFAULT_TAUS)
        if self.unsupervised:
            self.model_ = None
            self.history_ = []
            self.labels_ = self.hierarchy(X).labels
            return self
        if y is None:
            raise ValueError("HiLander requires y to be passed, but the target y is None: supervised training needs "
                             "class labels (or set unsupervised=True)")
        y = check_labels(y, X.shape[0])
        t0 = time.perf_counter()
        val = holdout_classes(y, self.validation_fraction, self.seed)
        if val.any() and (np.unique(y[val]).size < 2 or val.sum() <= self.k or (~val).sum() <= self.k):
            log.info("validation: too few classes or rows to hold out %.0f%%; training on all rows",
                     100 * self.validation_fraction)
            val[:] = False
        x_train, y_train = (X[~val], y[~val]) if val.any() else (X, y)
        with deterministic_training(self._torch_device()):
            self._train(x_train, y_train)
        if val.any():
            self._validate(X[val], y[val])
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _train(self, X, y) -> None:
        torch.manual_seed(self.seed)
        device = self._torch_device()
        settings = ((self.k, self.train_levels),)
        graphs = [g for x_t, y_t in self.training_tables(X, y)
                  for g in ground_truth_graphs(x_t, y_t, settings, knn_method=self.knn, seed=self.seed)]
        model = self.new_model(X.shape[1])
        train_kwargs = dict(
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, balance=self.balance,
            focal_gamma=self.focal_gamma, seed=self.seed, all_edges=self.conn_edges == "all", device=device,
        )
        ground_truth, own_levels = training_phases(self.epochs, self.self_training)
        self.history_ = train_lander(model, graphs, epochs=ground_truth.epochs, **train_kwargs)
        if own_levels is not None:
            # Higher levels at inference are built from the model's own (imperfect) merges, which the
            # ground-truth hierarchy never shows: add the model's own levels of the training data.
            self.model_ = model.cpu().eval()
            own = self.own_levels(X, y)
            log.info("self-training: %d more level graphs (%s nodes)", len(own), [g.n for g in own])
            self.history_ += train_lander(
                model, self_training_graphs(graphs, own), epochs=own_levels.epochs, refit_normalization=False,
                **train_kwargs,
            )
        self.model_ = model.cpu().eval()

    def _validate(self, x_val, y_val) -> None:
        """Choose ``taus_`` and ``n_levels_`` on held-out classes (see
        :func:`agc_ray.core.calibration.select_levels`)."""
        device = self._torch_device()
        self.validation_ = select_levels(
            x_val, y_val,
            lambda g: score_level(self.model_, g, device=device),
            lambda p, density, nbr, sim, tau: decode(p, density, nbr, sim, tau=tau, mode=self.decode),
            k=self.k, max_levels=self.levels or DEFAULT_LEVELS, knn=self._knn,
        )
        self.taus_, self.n_levels_ = self.validation_["taus"], self.validation_["levels"]
        log.info("validation (%d rows): tau per level %s, %d level(s), Fp %.4f Fb %.4f, %.1fs",
                 x_val.shape[0], self.taus_, self.n_levels_, self.validation_["scores"][-1]["fp"],
                 self.validation_["scores"][-1]["fb"], self.validation_["seconds"])

    def _knn(self, feats, info: dict | None = None, below=None, skip_ivf: bool = False):
        return knn_graph(feats, self.k, method=self.knn, seed=self.seed, normalize=False, recall=self.knn_recall,
                         info=info, below=below, skip_ivf=skip_ivf)

    def training_tables(self, X, y) -> list[tuple[np.ndarray, np.ndarray]]:
        """The labelled tables trained on: ``(X, y)`` and, with ``subsample_identities``, a seeded copy
        in which each identity keeps a random share of its rows
        (:func:`~agc_ray.core.train.subsampled_identities`)."""
        return training_tables(X, y, subsample=self.subsample_identities, seed=self.seed)

    def own_levels(self, X, y) -> list:
        """Training graphs of the higher levels this model builds from labelled X (labels carried by
        peaks): what the second half of ``fit`` adds to the ground-truth hierarchy; those of X, then
        those of its identity-subsampled copy (:meth:`training_tables`).

        Every level is decoded at level 0's tau: the model that builds them has not yet been trained
        on levels of its own, and its purer merges made the better training levels (regime suite,
        20K rows, Fp of the returned level with own levels at 0.9 / at 0.6 above level 0: size5
        0.751 / 0.713, size60 0.775 / 0.761, distractors 0.786 / 0.774, size20 0.797 / 0.798).
        """
        collected = []
        for x_t, y_t in self.training_tables(X, y):
            decoder = self.level_decoder(tau=self.level_tau(0))
            build_hierarchy(
                x_t, lambda g, level: decoder(g, level)[0], k=self.k, levels=self.train_levels,
                early_stop=False, labels=y_t, knn=self._knn,
                on_level=lambda level, g: collected.append(to_train_graph(g, self.k, level)) if level > 0 else None,
            )
        return collected

    def hierarchy(self, X) -> Hierarchy:
        """Cluster X (N, D): every level's labels with each level's stats and the selected level."""
        self.validate_params()
        self._check_fitted()
        X = self._validate_X(X, reset=False)
        torch.manual_seed(self.seed)
        decoder = self.level_decoder()
        stats, infos, knn_infos = [], [], []

        def decode_level(g, level):
            parent, info = decoder(g, level)
            infos.append(info)
            return parent

        def knn(feats, below=None):
            missed = any(ivf_missed(i) for i in knn_infos)  # the levels above are no easier
            knn_infos.append({})
            return self._knn(feats, knn_infos[-1], below=below, skip_ivf=missed)

        levels = build_hierarchy(
            X, decode_level, k=self.k, levels=self.max_levels(), early_stop=self.stops_early(), knn=knn, stats=stats,
            level_tau=self.level_tau, boundary=self.boundary_rule(),
        )
        for level_stats, info, knn_info in zip(stats, infos, knn_infos):
            level_stats.update(knn_info, **info)
        return Hierarchy(levels, stats, decoder.selected_level(len(levels)))

    def boundary_rule(self) -> BoundaryRule | None:
        """The boundary merge of the levels above 0 (:mod:`agc_ray.core.boundary`), None when off."""
        return None if self.boundary_closeness is None else BoundaryRule(self.boundary_closeness, self.seed)

    def predict_hierarchy(self, X) -> list[np.ndarray]:
        """Cluster X (N, D): every level's (N,) int64 labels, finest first, each coarsening the last."""
        return self.hierarchy(X).levels

    def predict(self, X) -> np.ndarray:
        """The (N,) int64 labels of the selected level: the top level, which is the depth chosen on
        validation when there was one; unsupervised without tau, the level decoded by average linkage
        above the last one one step below the table's own threshold (see
        :class:`~agc_ray.core.hierarchy.AdaptiveSchedule`)."""
        return self.hierarchy(X).labels

    def fit_predict(self, X, y=None):
        """Fit, then cluster X: unsupervised, ``labels_``; supervised, ``predict(X)`` of the model
        trained on X and y."""
        self.fit(X, y)
        return self.labels_ if self.unsupervised else self.predict(X)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write ``path/config.json`` (parameters, dimension, history) and ``path/weights.pt``."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        params = self.get_params()
        config = {
            "format": "agc_ray.HiLander",
            "agc_ray_version": _package_version(),
            "params": params,
            "n_features_in": getattr(self, "n_features_in_", None),
            "history": getattr(self, "history_", []),
            "validation": getattr(self, "validation_", None),
            "default_taus": self.default_taus(),
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
        if params.get("unsupervised", False):
            est = cls(**params)
            est.model_ = None
        else:
            weights = path / WEIGHTS_FILE
            if not weights.is_file():
                raise ValueError(f"{path}: {WEIGHTS_FILE} not found")
            est = cls.from_weights(torch.load(weights, map_location="cpu", weights_only=True),
                                   config.get("n_features_in"), **params)
        est.n_features_in_ = config.get("n_features_in")
        est.history_ = config.get("history", [])
        # Directories saved before the validation pass have none: their params carry tau and levels.
        est.validation_ = config.get("validation")
        est.taus_ = est.validation_["taus"] if est.validation_ else None
        est.n_levels_ = est.validation_["levels"] if est.validation_ else None
        # Directories saved before the per-level defaults were trained class-balanced at every level.
        est.default_taus_ = config.get("default_taus", [LEGACY_TAU])
        return est
