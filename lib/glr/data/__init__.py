"""Data: GLDv2 readers, the root and its splits, images and transforms, the embedded synthetic dataset, geography.
"""
