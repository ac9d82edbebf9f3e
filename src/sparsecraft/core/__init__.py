"""The mask engine: selection, patterns, scores, distributions, masks that last, save/load."""
