"""Sparsity and FLOPs accounting, reports and plots."""
