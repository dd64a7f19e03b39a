"""The model: pooling layers, the embedding network, margin heads, self-describing artifacts, weights manifests.
"""
