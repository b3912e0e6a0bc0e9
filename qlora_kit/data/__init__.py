"""Training rows to token samples, in the order the data flows:
``read`` → ``formats`` (with ``tools`` for tool-calling rows) → ``sources`` (one or several, split and mixed by
weight) → ``system_prompt`` → ``labels`` (chat-template spans) → ``encode`` → ``build`` (audit, split, held-out
rows, fingerprint) → ``summary``; ``batching`` plans and collates micro-batches."""
