"""Published sparsity methods, one module each; they build on sparsecraft.core only."""
