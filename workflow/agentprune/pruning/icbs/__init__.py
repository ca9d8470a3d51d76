"""iCBS: iterative Combinatorial Brain Surgeon (block-wise QUBO pruning, arXiv 2411.17796)."""
