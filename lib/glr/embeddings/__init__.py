"""Embeddings: extraction (images → (N, D) float32) and the stores they are kept in (.npz, sharded).
"""
