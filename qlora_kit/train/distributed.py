"""Multi-process training (DDP, FSDP-QLoRA) through accelerate: everything that knows about ranks.

``qlora-kit train`` runs as one process unless a launcher started it
(``accelerate launch ... -m qlora_kit train``, ``torchrun --nproc_per_node N -m qlora_kit
train``: ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment).  Then :func:`start`
builds an ``accelerate.Accelerator`` — NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``),
gloo on CPU — with a collective timeout, so a rank that dies or hangs never leaves the
others waiting for ever.  The training recipe (``train/``) asks the returned
:class:`Dist` at a few points; a single process gets :data:`SINGLE`, whose methods do
nothing, so single-process behaviour is unchanged.

The contract (docs/CONTRACTS.md, "Multi-process training"):

- **Same global batch, same result.**  The data plan is the plan of the *global*
  micro-batch (``world_size x micro_batch_size`` rows, :func:`world_size`); rank ``r`` takes
  its contiguous share (:meth:`Dist.local_rows`), a rank with no row in a short final
  micro-batch runs a fully masked row so the collectives match.  The loss is divided by the
  step's *global* count of trainable tokens (every rank counts it from the plan, no
  communication) and multiplied by ``world_size`` because DDP and FSDP average gradients:
  the gradients are the sums a 1-process run with ``world_size x micro_batch_size`` gets.
  Gradients are synchronised only on the last micro-batch of an accumulation
  (:meth:`Dist.accumulating`).
- **Agreement at step boundaries.**  A stop signal reaching any rank (or the launcher) is
  all-reduced at the next step boundary (:meth:`Dist.any`), so every rank stops after the
  same step; non-finite flags and the logged loss are all-reduced likewise.
- **One writer.**  Rank 0 alone prepares the output directory and writes files; the others
  wait for it at :meth:`Dist.barrier`.  Checkpoints gather every rank's RNG state (and,
  under FSDP, its optimizer shard) to rank 0 (:meth:`Dist.gather`).
- **One error line.**  A failure before training (config, data, model, output directory,
  memory) is exchanged between the ranks (:meth:`Dist.together`, :meth:`Dist.from_main`) and
  printed once; during training an error that every rank raises identically is printed by
  rank 0, one that only one rank hits by that rank (``[rank r]``), and a rank that only sees
  a collective fail because a peer died stays quiet (:func:`translate_failure`).
- **FSDP-QLoRA** (FSDP1 through accelerate, ``distributed_type: FSDP`` in the accelerate
  config): 4-bit storage in the compute dtype, LoRA layers wrapped on their own
  (transformers' ``update_fsdp_plugin_peft``), gradients clipped by FSDP, adapters gathered
  for saving.  FSDP2 with a 4-bit base is refused (bitsandbytes #1945).  Without CUDA an
  FSDP launch runs plain DDP over gloo (said in the log, not silently).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from qlora_kit.core import errors
from qlora_kit.core.errors import (
    ConfigError,
    DataError,
    ModelError,
    NonFiniteLossError,
    OutputError,
    PeerFailed,
    Preempted,
    QloraKitError,
)
from qlora_kit.plan.parallel import Parallel
from qlora_kit.rundir.checkpoint import rng_state
from qlora_kit.train import peers

log = logging.getLogger("qlora_kit")

TIMEOUT_ENV = "QLORA_KIT_COLLECTIVE_TIMEOUT"  # seconds a collective may wait for the slowest rank
DEFAULT_TIMEOUT_S = 1800
FSDP2_ISSUE = "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1945"


# Errors every rank raises identically (same files, same config, agreed decisions): printed by rank 0 only.
SHARED_ERRORS = (ConfigError, DataError, ModelError, OutputError, Preempted, NonFiniteLossError)
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe", "socket closed",
              "connection refused", "communicator was aborted", "nccl error", "process group has been destroyed")
_TIMED_OUT = ("timed out", "timeout", "watchdog")
T = TypeVar("T")
PEER_LOST_FIX = ("a process killed without a word was often the out-of-memory killer (see `dmesg`); the run continues "
                 "from its last checkpoint with the same launch and --resume")


def env_int(name: str, default: int) -> int:
    """An integer environment variable, or ``default`` when unset or not a number."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """True when a launcher started this process as one of several, or asked for FSDP (even with one)."""
    return env_int("WORLD_SIZE", 1) > 1 or (fsdp_requested() and "LOCAL_RANK" in os.environ)


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched)."""
    return env_int("RANK", 0)


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that prints and writes."""
    return _CURRENT.rank == 0 if _CURRENT.active else env_rank() == 0


def fsdp_requested() -> bool:
    """The accelerate config (``distributed_type: FSDP``) asked for FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_version() -> int:
    return env_int("FSDP_VERSION", 1)


def fsdp_offload() -> bool:
    """FSDP keeps the sharded parameters in host memory (``fsdp_offload_params: true``)."""
    return os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"


def collective_timeout() -> timedelta:
    """How long a collective waits for the slowest rank (``QLORA_KIT_COLLECTIVE_TIMEOUT`` seconds).

    Raises:
        ConfigError: the variable is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds",
                          f"e.g. {TIMEOUT_ENV}={DEFAULT_TIMEOUT_S}")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Dist:
    """One process's place in the run.  The default instance (:data:`SINGLE`) is a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "single"  # "single", "ddp" or "fsdp"
    backend: str | None = None
    device: torch.device | None = None
    accelerator: Any = None
    control: Any = None  # gloo group for host-side flags (no GPU sync)
    peers: peers.Peers = ()  # every rank's (host, PID): names a rank that dies without a word

    @property
    def active(self) -> bool:
        """More than one process, or FSDP (which wraps the model even with one)."""
        return self.strategy != "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    def load_device(self, device: torch.device) -> torch.device:
        """Where the 4-bit base is loaded: on the CPU under FSDP with offloaded parameters, else ``device``.

        With ``fsdp_offload_params`` the shards live in host memory anyway, and FSDP moves each
        unit to this GPU only while it shards it: the whole 4-bit model never has to fit on one
        GPU (bitsandbytes moves quantised weights without quantising them again, PR #970).
        """
        return torch.device("cpu") if self.fsdp and fsdp_offload() else device

    def parallel(self) -> Any:
        """This run as the planner's :class:`qlora_kit.plan.Parallel` (per-GPU memory)."""

        if not self.active:
            return Parallel()
        return Parallel(self.world_size, ("fsdp-offload" if fsdp_offload() else "fsdp") if self.fsdp else "ddp")

    def describe(self) -> dict[str, Any]:
        """What the manifest and checkpoints record (a resume must match it)."""
        return {"world_size": self.world_size, "strategy": self.strategy, "backend": self.backend,
                "fsdp_offload": self.fsdp and fsdp_offload()}

    # ----------------------------------------------------------------- agreeing

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (host-side all-reduce)."""
        if not self.active or self.world_size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (on its device; a copy, the input is not changed)."""
        if not self.active or self.world_size == 1:
            return tensor
        import torch.distributed as dist

        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def barrier(self) -> None:
        """Wait until every rank got here (e.g. until rank 0 finished writing)."""
        if self.active and self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.control)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); None on the others."""
        if not self.active or self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank.

        Raises:
            whatever ``fn`` raised, on every rank (printed by rank 0 only).
        """
        if not self.active or self.world_size == 1:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except BaseException as exc:
                box[0] = ("error", _portable(exc))
                dist.broadcast_object_list(box, src=0, group=self.control)
                exc.coordinated = True  # type: ignore[attr-defined]
                raise
        dist.broadcast_object_list(box, src=0, group=self.control)
        kind, value = box[0]
        if kind == "error":
            raise _silenced(_rebuild(value))
        return value

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """End every rank when the block fails on any rank; the lowest failing rank reports it.

        Use around work that makes no collective call (loading data and the model): each
        rank finishes its part, then all exchange how it went.
        """
        if not self.active or self.world_size == 1:
            yield
            return
        import torch.distributed as dist

        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:  # StopNow / KeyboardInterrupt included: the others must not wait
            error = exc
        outcomes: list[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, None if error is None else _portable(error), group=self.control)
        failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if not failed:
            return
        first_rank, first = failed[0]
        if error is not None and first_rank == self.rank:
            if self.rank and isinstance(error, QloraKitError):
                error.rank_label = f"rank {self.rank}"  # type: ignore[attr-defined]
            error.coordinated = True  # type: ignore[attr-defined]
            raise error
        raise _silenced(_rebuild(first)) from error

    # ----------------------------------------------------------------- batches

    def local_rows(self, rows: Sequence[Any]) -> tuple[list[Any], bool]:
        """This rank's share of a global micro-batch, and whether it must run a masked stand-in.

        Contiguous shares of ``ceil(len(rows) / world_size)`` rows; a rank left without rows
        (short final micro-batch) gets the first row back with ``masked`` True: its forward and
        backward keep the collectives matched and its labels are all ignored.
        """
        if not self.active or self.world_size == 1:
            return list(rows), False
        share = math.ceil(len(rows) / self.world_size)
        mine = list(rows[self.rank * share:(self.rank + 1) * share])
        if mine:
            return mine, False
        return [rows[0]], True

    def loss_factor(self) -> float:
        """DDP and FSDP average gradients over the ranks; the loss is scaled so they are summed."""
        return float(self.world_size) if self.active else 1.0

    def accumulating(self, model: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient synchronisation on all but the ``last`` micro-batch of a step."""
        if not self.active or last or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

    # ----------------------------------------------------------------- the model

    def wrap(self, model: Any) -> Any:
        """The model to run forward/backward on: DDP or FSDP around ``model`` (``model`` itself when single)."""
        if not self.active:
            return model
        if self.fsdp:
            from transformers.integrations.fsdp import update_fsdp_plugin_peft

            update_fsdp_plugin_peft(model, self.accelerator)  # LoRA layers wrapped on their own, storage dtype
            base = model.get_base_model()
            if getattr(base, "hf_device_map", None) == {"": "cpu"}:
                # Loaded on the CPU (load_device): FSDP places every unit on this GPU as it shards it
                # (device_id); the map must say so, or accelerate takes the model for one left on another device.
                base.hf_device_map = {"": self.device.index}
        return self.accelerator.prepare_model(model)

    def clip_grad_norm(self, wrapped: Any, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the gradients to ``max_norm``; returns the total norm over every rank's gradients."""
        if self.fsdp:
            return wrapped.clip_grad_norm_(max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def adapter_state(self, wrapped: Any, model: Any) -> dict[str, torch.Tensor] | None:
        """The full adapter weights on rank 0 (FSDP: gathered unit by unit); None when ``model`` has them whole.

        Only the LoRA units are gathered, never the 4-bit base.  Every rank must call this.
        """
        if not self.fsdp:
            return None
        from peft import get_peft_model_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        full: dict[str, torch.Tensor] = {}
        names = {id(m): n for n, m in wrapped.named_modules()}
        for unit in FSDP.fsdp_modules(wrapped):
            if not any(p.requires_grad for p in unit.parameters(recurse=False)):
                continue
            with FSDP.summon_full_params(unit, recurse=False, writeback=False, offload_to_cpu=True):
                prefix = names[id(unit)]
                for pname, param in unit.module.named_parameters(recurse=False):
                    full[_clean_fsdp_name(f"{prefix}.{pname}")] = param.detach().clone()
        if not self.is_main:
            return {}
        return get_peft_model_state_dict(model, state_dict=full)

    def rank_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What each rank contributes to a checkpoint: its RNG states (+ its optimizer shard under FSDP)."""

        state: dict[str, Any] = {"rng": rng_state()}
        if self.fsdp:
            state["optimizer"] = _to_cpu(optimizer.state_dict())
        return state


SINGLE = Dist()
_CURRENT = SINGLE


def current() -> Dist:
    """The process's :class:`Dist` (``SINGLE`` until :func:`start` ran in a launched process)."""
    return _CURRENT


def world_size() -> int:
    """Processes training together (1 when single): the data plan is the plan of the global batch."""
    return _CURRENT.world_size


def start() -> Dist:
    """Join the launched run: process group (with a timeout), device, strategy; ``SINGLE`` when not launched.

    Raises:
        ConfigError: FSDP2 with a 4-bit base (bitsandbytes #1945), or a bad timeout setting.
    """
    global _CURRENT
    if _CURRENT.active or not launched():
        return _CURRENT
    if fsdp_requested() and fsdp_version() != 1:
        raise ConfigError(
            f"FSDP{fsdp_version()} with a 4-bit base corrupts the packed NF4 weights (bitsandbytes issue #1945, "
            f"{FSDP2_ISSUE}); qlora-kit trains FSDP-QLoRA with FSDP1",
            "set fsdp_version: 1 in the accelerate config (configs/accelerate/fsdp_qlora_2gpu.yaml)",
        )
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    if fsdp_requested() and not cuda:  # accelerate would fail building its FSDP plugin without a device
        if env_rank() == 0:
            log.warning("FSDP needs CUDA GPUs: without them this launch trains with plain DDP over gloo")
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision="no",  # precision is qlora-kit's own (model.compute_dtype, lora.adapter_dtype)
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=collective_timeout()),
            DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False),
        ],
    )
    import torch.distributed as dist

    strategy = "fsdp" if fsdp_requested() else "ddp"
    control = dist.new_group(backend="gloo", timeout=collective_timeout()) if cuda else None
    device = accelerator.device if cuda else torch.device("cpu")
    _CURRENT = Dist(rank=accelerator.process_index, world_size=accelerator.num_processes,
                    local_rank=accelerator.local_process_index, strategy=strategy,
                    backend=dist.get_backend(), device=device, accelerator=accelerator, control=control,
                    peers=peers.record_peers(control))
    if not _CURRENT.is_main:
        logging.getLogger("qlora_kit").setLevel(logging.ERROR)  # rank 0 tells the story
    log.info("%d processes (%s over %s), this is rank %d on %s", _CURRENT.world_size, strategy.upper(),
             _CURRENT.backend, _CURRENT.rank, _CURRENT.device)
    return _CURRENT


def close() -> None:
    """Leave the process group (a process that exits without it aborts with SIGABRT)."""
    global _CURRENT
    if not _CURRENT.active:
        return
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # a peer may be gone already: leaving must not raise
        log.debug("leaving the process group: %s", exc)
    _CURRENT = SINGLE


@contextlib.contextmanager
def session() -> Iterator[Dist]:
    """``start()`` … ``close()`` around a command; a failed collective becomes :class:`PeerFailed`."""
    try:
        dist = start()
    except BaseException as exc:
        settle(exc)
        raise
    try:
        yield dist
        dist.barrier()  # leave together: a rank tearing its group down while a peer still writes can abort
    except BaseException as exc:
        translated = translate_failure(exc) if dist.active else None
        if translated is not None:
            if getattr(translated, "silent", False) and peers.claim_report():
                translated.silent = False  # the lost rank said nothing: one survivor names it
            settle(translated)
            raise translated from exc
        if dist.active:
            peers.mark_failed(dist.rank)  # this rank reports its own error: its peers stay quiet about losing it
        settle(exc)
        raise
    finally:
        if dist.active:  # the launcher SIGTERMs the ranks still running once one exits: finish leaving cleanly
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        close()


def translate_failure(exc: BaseException) -> PeerFailed | None:
    """A collective that failed because another rank died or hung, as :class:`PeerFailed` (else None).

    A peer that died reports its own error (or the launcher does): this rank stays quiet.
    A collective that timed out is reported, since the hung rank may never say anything.
    """
    if isinstance(exc, QloraKitError) or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    dist_error = type(exc).__module__.startswith("torch.distributed") or "gloo" in text or "nccl" in text
    if any(s in text for s in _TIMED_OUT) and dist_error:
        return PeerFailed(
            f"another process of this run stopped responding: a collective timed out ({_first_line(exc)})",
            f"check the other ranks' messages; {TIMEOUT_ENV} sets the timeout in seconds")
    if any(s in text for s in _PEER_GONE) or (dist_error and "peer" in text):
        failed = PeerFailed(f"{peers.describe_lost(_CURRENT.peers, _CURRENT.rank)} "
                            f"({peers.collective_reason(str(exc))})", PEER_LOST_FIX)
        failed.silent = True  # the lost rank reports its own error; else session() lets one survivor say it
        return failed
    return None


def report(exc: BaseException) -> tuple[bool, str]:
    """(print it?, prefix) for an error ending this process; the CLI asks before printing ``error:``."""
    if getattr(exc, "silent", False):
        return False, ""
    label = getattr(exc, "rank_label", None)
    return True, f"[{label}] " if label else ""


def settle(exc: BaseException) -> None:
    """Decide who prints an error that ends a multi-process run (call where the run fails).

    Errors every rank raised alike (config, data, model, output directory, an agreed stop or
    non-finite step) are printed by rank 0 only; any other error by the rank that hit it,
    labelled ``[rank r]``.  Errors already exchanged by :meth:`Dist.together` or
    :meth:`Dist.from_main` keep the decision made there.
    """
    if not (_CURRENT.active or launched()) or getattr(exc, "coordinated", False) \
            or not isinstance(exc, QloraKitError):
        return
    rank = _CURRENT.rank if _CURRENT.active else env_rank()
    if isinstance(exc, SHARED_ERRORS):
        if rank:
            exc.silent = True  # type: ignore[attr-defined]
    elif rank and not getattr(exc, "rank_label", None):
        exc.rank_label = f"rank {rank}"  # type: ignore[attr-defined]


def _silenced(exc: BaseException) -> BaseException:
    exc.silent = True  # type: ignore[attr-defined]
    exc.coordinated = True  # type: ignore[attr-defined]
    return exc


def _portable(exc: BaseException) -> tuple[str, str, str | None, int, str | None]:
    """An error as plain values that can cross to another rank: (class name, message, hint, exit code, label)."""
    if isinstance(exc, QloraKitError):
        return type(exc).__name__, exc.message, exc.hint, exc.exit_code, getattr(exc, "rank_label", None)
    return type(exc).__name__, _first_line(exc), None, 1, None


def _rebuild(value: tuple[str, str, str | None, int, str | None]) -> QloraKitError:
    name, message, hint, code, _label = value
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, QloraKitError)):
        return PeerFailed(f"another process of this run failed: {name}: {message}")
    rebuilt = cls.__new__(cls)
    QloraKitError.__init__(rebuilt, message, hint, code)
    return rebuilt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _to_cpu(tree: Any) -> Any:
    """Tensors of a nested state moved to the CPU (they cross to rank 0 as pickled objects)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def _clean_fsdp_name(name: str) -> str:
    """A parameter name inside FSDP wrappers as the unwrapped model names it."""
    return ".".join(part for part in name.split(".") if part not in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"))
