"""The QLoRA SFT recipe: ``setup`` → ``begin`` → ``train`` → ``finish``.

One readable loop instead of a trainer class hierarchy, because the guarantees users need
are easier to keep in plain code:

- ``recipe``: ``qlora-kit train`` from start to end, and what a failure leaves behind;
- ``setup`` and ``builders``: everything built in memory (model, data, optimizer, schedule),
  nothing written until every check passed; ``resume``: what a resume may change, and the
  newest checkpoint that verifies;
- ``loop``: the steps; ``order``: the data order (exact resume); ``guards``: non-finite
  losses; ``progress``: log lines and the progress bar; ``outputs``: every file the run
  writes (checkpoints and the adapter atomically, after a free-space check);
- ``distributed``: several processes (DDP, FSDP-QLoRA through accelerate), the few points
  where ranks matter.

Called as a function, ``qlora_kit.train(config, overrides=...)`` is the Python API
(``qlora_kit.api.train``, see ``qlora_kit/__init__.py``).
"""
