"""Using a trained model: ``load`` (a run, an export or a GGUF file), ``chat`` (the chat format:
prompts, end-of-turn and EOS ids) and ``generation`` (greedy or sampled tokens)."""
