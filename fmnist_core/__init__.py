"""fmnist_core: a report book of image classification on Fashion-MNIST, in three layers.

* ``fmnist_core.core``: the library (data, augmentation, models, the training loop and jobs, metrics,
  embeddings, plots, io, config); it imports neither of the other layers.
* ``fmnist_core.chapters``: one module or package per chapter of the book (its config, its jobs, what its
  notebook calls); chapters import only the core and their own package.
* ``fmnist_core.pipeline``: experiments, runner, verify, book, report, CLI and predict.
"""

__version__ = "0.1.0"
