"""``python -m qlora_kit``: the CLI, for launchers that start modules.

``accelerate launch --multi_gpu --num_processes 2 -m qlora_kit train CONFIG`` and
``torchrun --nproc_per_node 2 -m qlora_kit train CONFIG`` run one rank per process
(see qlora_kit/train/distributed.py).
"""

from qlora_kit.cli import main

if __name__ == "__main__":
    main()
