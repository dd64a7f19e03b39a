"""The offline Kaggle kernel: built from the package's own modules, tried locally, then submitted.

* :mod:`glr.kaggle.kernel.runtime` is what runs on Kaggle: it finds its inputs, writes a fallback
  submission first, embeds with the ensemble, post-processes and writes ``submission.csv``.
  It imports only the inference modules (no Lightning, no ``glr`` install).
* :mod:`glr.kaggle.kernel.build` writes ``kernels/NAME/``: one generated script embedding those
  modules (a compressed zip), the weights dataset folder and ``kernel-metadata.json``.
* :mod:`glr.kaggle.kernel.local` runs a built kernel in a simulated ``/kaggle`` with a fresh
  interpreter that cannot import the installed ``glr``, and checks parity with the library.
* :mod:`glr.kaggle.kernel.wheels` collects the wheels Kaggle's image lacks into a dataset folder.
"""
