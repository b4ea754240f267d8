"""Graph encoders with PyG's signatures (PyAGC's ``pyagc.encoders``).

``GCN``, ``GAT`` and ``GraphSAGE`` are PyG's own models, re-exported:
``GCN(in_channels, hidden_channels, num_layers, out_channels=None, dropout=0.0, act='relu', ...)``,
called as ``encoder(x, edge_index)``. :class:`MLP` is PyG's MLP with the same constructor order and
call signature; it ignores the edges (an attribute-only baseline).
"""

from torch_geometric.nn.models import GAT, GCN, GraphSAGE
from torch_geometric.nn.models.basic_gnn import BasicGNN

from agc_ray.encoders.mlp import MLP

__all__ = ["BasicGNN", "GAT", "GCN", "GraphSAGE", "MLP"]
