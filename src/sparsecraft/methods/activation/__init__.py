"""Activation sparsity: methods that make MLP activations exactly zero for most entries."""

from sparsecraft.methods.activation.relufication import ActivationL1, FATReLU, ProSparseSchedule, relufy, shift_threshold
from sparsecraft.methods.activation.topk import TopKActivation, activation_modules, apply_topk

__all__ = ["ActivationL1", "FATReLU", "ProSparseSchedule", "TopKActivation", "activation_modules", "apply_topk",
           "relufy", "shift_threshold"]
