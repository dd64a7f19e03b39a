"""Evaluation beyond the official scorer: the post-processing sweep and revisitop (Oxford / Paris).
"""
