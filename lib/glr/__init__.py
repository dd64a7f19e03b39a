"""glr: instance-level landmark retrieval and recognition on GLDv2.

Stages, one module each, in the order data flows through them:
``synth`` (embedded dataset) → ``data`` → ``model`` → ``embeddings`` → ``search`` →
``postprocess`` → ``submission`` → ``metrics``; ``pipeline`` chains them and ``cli`` exposes them.
Training's Lightning side is ``training`` (and ``export`` for multi-GPU embedding), kept apart so
that ``kernel`` (the offline Kaggle kernel generated from these modules) never imports Lightning;
``submit`` drives the kaggle client.
"""

__version__ = "0.1.0"
