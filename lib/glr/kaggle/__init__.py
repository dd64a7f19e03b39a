"""Kaggle: the client (datasets, kernels, submissions), weights packs, the offline kernel.
"""
