"""``python -m torchxform.coverage``: prints how vmap, grad/vjp and jvp
handle every op with a rule, and the totals.  The functions live in
``torchxform._coverage`` (``torchxform.coverage`` and ``torchxform.explain``)."""

from ._coverage import main

if __name__ == "__main__":
    main()
