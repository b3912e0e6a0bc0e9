"""Training-time memory and speed techniques, one small module each.

- ``loss``: loss fused with the lm_head projection (no ``[tokens x vocab]`` logits);
- ``packing``: padding-free packed micro-batches and the attention function that keeps
  packed samples apart without a T*T mask;
- ``offload``: checkpointed layer inputs held in pinned host memory, copied on a side stream;
- ``tiled_mlp``: the MLP computed in sequence tiles, forward and backward;
- ``precision``: compute dtype, fp32 adapter master weights under autocast, loss scaling;
- ``allocator``: the CUDA caching allocator's settings.

Each is switched on from the recipe (``train.setup``) and checked against the plain
reference path in its own test.
"""
