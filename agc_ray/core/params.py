"""HiLander's parameters, declared once: default, allowed values and a one-line help.

The estimator's signature and checks, the low-level defaults of :class:`~agc_ray.core.lander.Lander`
and :func:`~agc_ray.core.train.train_lander`, and the training job's config, flags and help all
derive from :data:`PARAMS`. No torch: the jobs' command lines import it without loading the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from agc_ray.core.boundary import BOUNDARY_CLOSENESS
from agc_ray.core.knn import METHODS as KNN_METHODS
from agc_ray.core.validation import check_param

#: Decode modes (``decode``): edge probability or similarity against tau.
DECODE_MODES = ("prob", "sim")


@dataclass(frozen=True)
class Param:
    """One parameter: its default, what values it takes, and a one-line help.

    ``kind``: ``int`` or ``float`` (checked against ``low`` / ``high``, inclusive), ``bool`` or ``str``
    (not range-checked; a str with ``options`` must be one of them). ``optional``: None is allowed
    (and then not checked).
    """

    default: Any
    help: str
    kind: type = str
    low: float | None = None
    high: float | None = None
    options: tuple | None = None
    optional: bool = False

    def check(self, name: str, value, *, error=ValueError) -> None:
        """Raise ``error`` (the message names ``name``, the value and the range) unless ``value`` fits."""
        if value is None and self.optional:
            return
        if self.options is not None:
            check_param(name, value, options=self.options, error=error)
        elif self.kind in (int, float):
            check_param(name, value, self.kind, self.low, self.high, error=error)


PARAMS: dict[str, Param] = {
    "k": Param(10, "neighbours per node", int, 1),
    "tau": Param(None, "decode threshold at every level (None: the model's per-level taus: chosen on validation, "
                       "else 0.9 at level 0, 0.5 at level 1, 0.95 above; unsupervised: derived from the table)",
                 float, -1.0, 1.0, optional=True),
    "levels": Param(None, "maximum hierarchy levels when clustering (None: chosen on validation, else 10; 6 unsupervised without tau)",
                    int, 1, optional=True),
    "epochs": Param(6, "training epochs", int, 1),
    "seed": Param(0, "seed of the split, weights, batch order, dropout and the kNN training samples", int),
    "device": Param("auto", "auto (CUDA when torch sees a GPU), cpu or cuda", options=("auto", "cpu", "cuda")),
    "knn": Param("auto", "kNN method: auto (exact up to 20K rows, IVF above), exact, ivf, hnsw", options=KNN_METHODS),
    "knn_recall": Param(0.95, "recall@k target of the IVF search (None: a fixed 16 probes)", float, 0.0, 1.0,
                        optional=True),
    "decode": Param("prob", "decode mode: prob or sim", options=DECODE_MODES),
    "early_stop": Param(True, "early-stop rule when clustering", bool),
    "boundary_closeness": Param(BOUNDARY_CLOSENESS, "above level 0, also merge clusters whose boundary in the level-0 kNN "
                                                    "graph is this close to their insides, from chance (None: off)",
                                float, 0.0, 1.0, optional=True),
    "unsupervised": Param(False, "cluster without labels or a model (similarity density, sim decode)", bool),
    "conv": Param("lander", "graph conv: lander or gat", options=("lander", "gat")),
    "hidden_channels": Param(128, "node embedding size", int, 1),
    "edge_channels": Param(128, "edge MLP width", int, 1),
    "dropout": Param(0.5, "dropout on the raw-feature input", float, 0.0, 0.99),
    "batch_size": Param(1024, "batch of seed nodes per step", int, 1),
    "lr": Param(3e-3, "peak learning rate (AdamW, one-cycle cosine)", float, 1e-8),
    "weight_decay": Param(1e-2, "AdamW weight decay", float, 0.0),
    "train_levels": Param(4, "hierarchy levels trained on (ground truth: levels 0-1; self-training: own levels "
                             "up to this)", int, 1),
    "conn_edges": Param("all", "linkage loss on 'all' edges or 'denser' ones", options=("all", "denser")),
    "balance": Param(True, "class-balanced linkage loss at level 0 (levels above keep their own class shares)", bool),
    "focal_gamma": Param(0.0, "focal loss gamma (0: plain BCE)", float, 0.0),
    "self_training": Param(True, "second half of the epochs also on the model's own levels", bool),
    "subsample_identities": Param(True, "train also on a seeded copy of the training rows in which each identity "
                                        "keeps a random share of its rows", bool),
    "validation_fraction": Param(0.0, "share of the training classes held out to choose tau and the levels",
                                 float, 0.0, 0.9),
}

def check_params(values: dict, name=lambda n: n, *, error=ValueError) -> None:
    """Check the parameters in ``values`` (a subset of :data:`PARAMS` by name) against their declaration,
    and tau against the decode mode (a probability: [0, 1] with 'prob' decode and a model); ``name``
    turns a parameter's name into the one the message shows (``"HiLander: k"``, ``"--k"``)."""
    for key, value in values.items():
        PARAMS[key].check(name(key), value, error=error)
    tau = values.get("tau")
    if tau is not None and values.get("decode", DEFAULTS.decode) == "prob" and not values.get("unsupervised", False):
        check_param(name("tau"), tau, float, 0.0, 1.0, error=error)


#: The defaults as attributes (``DEFAULTS.k``), for signatures.
DEFAULTS = SimpleNamespace(**{name: p.default for name, p in PARAMS.items()})
