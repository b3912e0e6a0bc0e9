"""A run directory (``output_dir``): its ``layout``, the ``lock`` that allows one writer, what ``start``
may do to it, the ``manifest``, ``metrics``, ``checkpoint``\s with their ``integrity`` records, the
``residual`` base of some inits, and reading a ``finished`` run."""
