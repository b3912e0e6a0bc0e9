"""Commands that sit on top of everything else: ``demo``, ``generate``/``chat`` and ``doctor``."""
