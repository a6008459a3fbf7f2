"""Unstructured sparsity: `sparsify` with uniform / OWL / MRP allocation over Wanda or magnitude scores."""
from gradmap.sparsity.sparsify import SparsifyResult, sparsify

__all__ = ["SparsifyResult", "sparsify"]
