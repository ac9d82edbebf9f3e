"""Sparse architecture search: the Random Search baseline and DASS (see each module's docstring)."""
