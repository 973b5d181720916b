"""Rules, one module per op family.  Importing this package registers them."""

from . import (  # noqa: F401
    conv,
    creation,
    data_dependent,
    elementwise,
    fft,
    indexing,
    linalg,
    loss,
    nn,
    norm,
    pooling,
    random,
    reduction,
    rnn,
    view,
)
