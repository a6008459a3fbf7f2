"""Unstructured and N:M sparsity: `sparsify` with uniform / OWL / MRP allocation over Wanda, magnitude or SparseGPT."""
from gradmap.sparsity.sparsify import SparsifyResult, sparsify

__all__ = ["SparsifyResult", "sparsify"]
