"""glr: instance-level landmark retrieval and recognition on GLDv2.

Stages, one module each, in the order data flows through them:
``synth`` (embedded dataset) → ``data`` → ``model`` → ``embeddings`` → ``search`` →
``submission`` → ``metrics``; ``pipeline`` chains them and ``cli`` exposes them.
"""

__version__ = "0.1.0"
