"""The model: pooling layers, the embedding network, margin heads, self-describing artifacts, weights manifests.

Margin heads (:func:`glr.model.heads.register_head`) and backbone adapters
(:func:`glr.model.adapters.register_adapter`) are registries. The import below is the list of
modules that register them: a new head or adapter in a module of its own is that module plus
its name here.
"""

from glr.model import adapters, heads  # noqa: F401  (the modules that register heads and adapters)
from glr.model import dolg, hybrid  # noqa: F401  (the modules that register architectures)
