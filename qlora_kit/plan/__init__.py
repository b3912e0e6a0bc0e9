"""The memory planner: peak GPU memory of a QLoRA run from the model's config alone.

``shape`` (the model) → ``techniques`` (what the config switches on) → ``terms`` (bytes of each
piece) and ``parallel`` (several GPUs) → ``estimate`` (the peak, phase by phase) → ``fit`` (what
fits a budget, ``auto`` settings) → ``report`` (``qlora-kit plan``).  The model itself is
specified in docs/memory-model.md."""
