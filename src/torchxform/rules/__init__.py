"""Rules, one module per op family.  Importing this package registers them."""

from . import creation, data_dependent, elementwise, indexing, linalg, nn, random, reduction, view  # noqa: F401
