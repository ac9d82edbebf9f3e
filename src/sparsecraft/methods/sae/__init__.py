"""Sparse autoencoders for interpretability: ReLU + L1, TopK, BatchTopK, Feature Choice and
Mutual Choice SAEs, and transcoders, trained on a model's activations (see each module's papers)."""

from sparsecraft.methods.sae.io import export_saelens, load_sae, save_sae
from sparsecraft.methods.sae.model import KINDS, SAEConfig, SparseAutoencoder
from sparsecraft.methods.sae.train import TrainConfig, train_sae

__all__ = ["KINDS", "SAEConfig", "SparseAutoencoder", "TrainConfig", "export_saelens", "load_sae", "save_sae", "train_sae"]
