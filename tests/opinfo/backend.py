"""The transforms under test: torchxform's, or torch.func's for comparison.

``TORCHXFORM_OPINFO_BACKEND`` picks the default backend of the pytest run:
``torchxform`` (the default) or ``torch.func``.  The report builds both.

A backend also knows how to recognise its own slow vmap loop fallback among
the warnings a check raised:
- torchxform warns ``torchxform.SlowFallbackWarning`` once per op (the
  memory of which ops warned is reset before every check);
- torch.func warns a UserWarning "There is a performance drop because we have
  not yet implemented the batching rule ..." once fallback warnings are on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

BACKENDS = ("torchxform", "torch.func")
ENV_VAR = "TORCHXFORM_OPINFO_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    vmap: Callable
    grad: Callable
    vjp: Callable
    jvp: Callable
    reset: Callable[[], None]
    is_fallback_warning: Callable[[Warning], bool]


def _torchxform() -> Backend:
    import torchxform
    from torchxform._core.errors import reset_fallback_warnings

    return Backend(
        name="torchxform",
        vmap=torchxform.vmap,
        grad=torchxform.grad,
        vjp=torchxform.vjp,
        jvp=torchxform.jvp,
        reset=reset_fallback_warnings,
        is_fallback_warning=lambda w: issubclass(w.category, torchxform.SlowFallbackWarning),
    )


def _torch_func() -> Backend:
    import torch.func

    def reset():
        torch._C._functorch._set_vmap_fallback_warning_enabled(True)

    return Backend(
        name="torch.func",
        vmap=torch.func.vmap,
        grad=torch.func.grad,
        vjp=torch.func.vjp,
        jvp=torch.func.jvp,
        reset=reset,
        is_fallback_warning=lambda w: "There is a performance drop because we have not yet implemented the batching rule"
        in str(w.message),
    )


def get_backend(name: str | None = None) -> Backend:
    name = name or os.environ.get(ENV_VAR, "torchxform")
    if name == "torchxform":
        return _torchxform()
    if name in ("torch.func", "torch_func", "functorch"):
        return _torch_func()
    raise ValueError(f"{ENV_VAR}={name!r}: expected one of {BACKENDS}")
