"""Training rows to token samples, in the order the data flows:
``read`` → ``formats`` → ``labels`` (chat-template spans) → ``encode`` → ``build`` (audit, split,
held-out rows) → ``summary``; ``batching`` plans and collates micro-batches."""
