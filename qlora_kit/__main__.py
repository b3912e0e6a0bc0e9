"""``python -m qlora_kit`` and the ``qlora-kit`` console script: the CLI, for launchers that start modules too.

``accelerate launch --multi_gpu --num_processes 2 -m qlora_kit train CONFIG`` and
``torchrun --nproc_per_node 2 -m qlora_kit train CONFIG`` run one rank per process
(see qlora_kit/train/distributed.py).

The stop handler goes in before anything heavy is imported: SIGTERM during the first seconds
exits 75 with nothing written (README: exit codes), not 143.
"""

import sys

from qlora_kit.core.errors import EXIT_PREEMPTED
from qlora_kit.core.signals import StopNow, install_startup_stop, startup_stop_lines

install_startup_stop()
try:
    from qlora_kit.cli import main
except StopNow as exc:
    _command = next((a for a in sys.argv[1:] if not a.startswith("-")), "qlora-kit")
    _error, _fix = startup_stop_lines(exc.signal_name, _command)
    print(f"error: {_error}\nfix: {_fix}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_PREEMPTED) from None

if __name__ == "__main__":
    main()
