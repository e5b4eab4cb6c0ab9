"""Data sources, partitioners and simulated attacks.

``partition`` and ``attacks`` are re-exported as modules
(``partition.dirichlet(labels, n_parties, alpha=0.5, rng=rng)``).
"""

from fedgrpc.datasets import attacks, partition
from fedgrpc.datasets.attacks import (
    Attack,
    apply_data_attack,
    apply_update_attack,
    parse_assignments,
    parse_attack,
)
from fedgrpc.datasets.sources import (
    Dataset,
    load_dataset,
    load_mnist,
    read_idx,
    save_npz,
    split_holdout,
    subset,
)

__all__ = [
    "Attack",
    "Dataset",
    "apply_data_attack",
    "apply_update_attack",
    "attacks",
    "load_dataset",
    "load_mnist",
    "parse_assignments",
    "parse_attack",
    "partition",
    "read_idx",
    "save_npz",
    "split_holdout",
    "subset",
]
