"""estimate(): the peak memory of one configuration, phase by phase (docs/memory-model.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlora_kit.core.config import Config
from qlora_kit.ops.checkpointing import checkpointed_layers
from qlora_kit.plan.parallel import PARALLEL, Parallel, parallel_components
from qlora_kit.plan.shape import ModelShape, linear_layers
from qlora_kit.plan.techniques import Techniques, techniques
from qlora_kit.plan.terms import (
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION_EXPANDABLE,
    FRAGMENTATION_LEGACY,
    INIT_WORK_FACTOR,
    LOSS_FP32_BYTES,
    LOSS_SCALARS_PER_LABEL,
    LOSS_TOKEN_TILE,
    LOSS_VOCAB_TILE,
    MLP_TILE_TOKENS,
    NF4_BLOCK,
    NORM_BACKWARD_FP32_COPIES,
    OFFLOAD_IN_FLIGHT,
    PAIR_INPUT_BYTES,
    STEP_INPUT_BYTES,
    adapter_components,
    attention_square,
    flash_backward_per_token,
    layer_saved_bytes,
    mlp_is_tiled,
    mlp_tile_per_token,
    nf4_bytes,
    norm_saved_per_token,
    optimizer_bytes,
    variant_tensors,
    weight_components,
)


@dataclass
class MemoryPlan:
    """Predicted memory of one configuration: components per phase, in bytes."""

    shape: ModelShape
    micro_batch_size: int
    max_length: int
    compute_dtype: str
    targets: list[str]
    trainable_parameters: int
    phases: dict[str, dict[str, int]]
    paged_optimizer_bytes: int
    weights_bytes: int
    host_bytes: int = 0
    stage: str = ""  # the moment of the backward phase that peaks
    fragmentation_fraction: float = 0.05
    peak_phase: str = ""
    allocated_peak: int = 0
    fragmentation: int = 0
    cuda_context: int = CUDA_CONTEXT_BYTES

    def __post_init__(self) -> None:
        sums = {name: sum(parts.values()) for name, parts in self.phases.items()}
        self.peak_phase = max(sums, key=lambda k: sums[k])
        self.allocated_peak = sums[self.peak_phase]
        self.fragmentation = int(self.allocated_peak * self.fragmentation_fraction)

    @property
    def total_bytes(self) -> int:
        """Predicted GPU memory in use at the peak (what nvidia-smi would show)."""
        return self.allocated_peak + self.fragmentation + self.cuda_context

    @property
    def torch_allocated_peak(self) -> int:
        """Predicted ``torch.cuda.max_memory_allocated`` (paged optimizer state excluded)."""
        paged = self.paged_optimizer_bytes if "optimizer_state" in self.phases[self.peak_phase] else 0
        return self.allocated_peak - paged

    @property
    def torch_reserved_peak(self) -> int:
        """Predicted ``torch.cuda.max_memory_reserved``."""
        return self.torch_allocated_peak + self.fragmentation

    def breakdown(self) -> dict[str, int]:
        """Components at the peak phase, plus fragmentation margin and CUDA context."""
        return {**self.phases[self.peak_phase], "fragmentation_margin": self.fragmentation,
                "cuda_context": self.cuda_context}

    def phase_totals(self) -> dict[str, int]:
        """Total bytes of each phase (load, init, loss, backward)."""
        return {name: sum(parts.values()) for name, parts in self.phases.items()}


def estimate(cfg: Config, shape: ModelShape, micro_batch_size: int | None = None, max_length: int | None = None,
             *, device: str = "cuda", labelled_tokens: int | None = None, parallel: Parallel | None = None
             ) -> MemoryPlan:
    """Predict the memory of ``cfg`` on ``shape`` (optionally at another micro-batch/length).

    ``"auto"`` settings count as their conservative choice (see :func:`resolve_auto` for
    the planner's). ``labelled_tokens`` (tokens that carry a label) defaults to all of them.
    ``device="cpu"`` models the CPU kernels (used to check the model against measurements).
    ``parallel``: plan one GPU of a multi-GPU run (default: the :func:`planning_for` block's).

    Raises:
        ModelError: LoRA targets that this architecture does not have.
    """
    batch = micro_batch_size or cfg.train.micro_batch_size
    length = max_length or cfg.train.max_length
    rows = batch * sequences_per_item(cfg)  # preference methods: a chosen and a rejected sequence per pair
    tokens = rows * length
    labelled = tokens if labelled_tokens is None else min(labelled_tokens, tokens)
    tech = techniques(cfg, shape, device)
    weights = weight_components(shape, tech)
    numels, frozen = variant_tensors(shape, list(tech.targets), cfg.lora)
    static = {**weights, **adapter_components(numels, tech, frozen)}
    if cfg.train.method == "dpo" and cfg.model.adapter is not None:
        static["reference_adapter"] = sum(numels) * tech.adapter_bytes  # the frozen copy of the start adapter
    loss_phase, backward_phase, stage, host = activation_phases(shape, tech, rows, length, labelled, numels)
    if cfg.train.method != "sft":
        loss_phase["step_inputs"] += PAIR_INPUT_BYTES * tokens
        backward_phase["step_inputs"] += PAIR_INPUT_BYTES * tokens
    parallel = parallel or PARALLEL.get()
    max_linear = max(lin.numel for lin in linear_layers(shape).values())
    load = {**weights, "quantisation_buffer": max_linear * tech.s + 4 * math.ceil(max_linear / NF4_BLOCK)}
    if not parallel.single:
        per_gpu, per_gpu_load, host_shards = parallel_components(shape, tech, numels, parallel)
        static = {**static, **per_gpu}
        load = per_gpu_load or load
        host += host_shards
    phases = {"load": load, "loss": {**static, **loss_phase}, "backward": {**static, **backward_phase}}
    if cfg.train.method == "dpo":
        phases["reference"] = {**static, **reference_phase(shape, tech, rows, length, labelled, loss_phase)}
    init = init_phase(shape, cfg, tech, tokens, numels, frozen, (loss_phase, backward_phase))
    if init:
        phases["init"] = {**weights, **init}
    _, pageable = optimizer_bytes(numels, tech.optimizer, tech.adapter_bytes)
    paged = pageable if tech.optimizer.startswith("paged_") and device == "cuda" and not parallel.fsdp else 0
    return MemoryPlan(
        shape=shape, micro_batch_size=batch, max_length=length,
        compute_dtype="float32" if tech.s == 4 else ("bfloat16" if cfg.model.compute_dtype == "auto"
                                                     else cfg.model.compute_dtype),
        targets=list(tech.targets), trainable_parameters=sum(numels),
        phases=phases,
        paged_optimizer_bytes=paged, weights_bytes=sum(weights.values()), host_bytes=host, stage=stage,
        fragmentation_fraction=fragmentation_fraction(),
    )


def sequences_per_item(cfg: Config) -> int:
    """Sequences one item of ``micro_batch_size`` puts through the model: 1 row for SFT, 2 per preference pair."""
    return 1 if cfg.train.method == "sft" else 2


def reference_phase(shape: ModelShape, tech: Techniques, batch: int, length: int, labelled: int,
                    loss_phase: dict[str, int]) -> dict[str, int]:
    """DPO's reference forward (``train.preference``): the same rows without gradients, before the policy's.

    Nothing is kept for a backward: one layer's transient working set at a time (its input and
    output hidden states and the MLP's three ``[tokens, I]`` intermediates, or one tile of them),
    then the fused loss's forward tiles on the last hidden state.  Never the step's peak in
    practice (the policy's loss phase holds the same plus the checkpoints), but planned as a phase.
    """
    s, h, n = tech.s, shape.hidden_size, batch * length
    mlp_rows = min(n, MLP_TILE_TOKENS) if mlp_is_tiled(tech, batch, length) else n
    layer = 2 * s * h * n + 3 * s * shape.intermediate_size * mlp_rows
    if tech.fused_loss:
        head = fused_loss_forward_bytes(shape, tech, batch, length, labelled)
    else:
        head = s * h * n + (s + 4) * shape.vocab_size * n  # logits and their fp32 log-softmax
    return {"step_inputs": loss_phase["step_inputs"], "attention_mask": loss_phase["attention_mask"],
            "autocast_adapter_copies": loss_phase["autocast_adapter_copies"], "reference_forward": max(layer, head)}


def init_phase(shape: ModelShape, cfg: Config, tech: Techniques, tokens: int, numels: list[int], frozen: int,
               passes: tuple[dict[str, int], dict[str, int]]) -> dict[str, int]:
    """Memory of ``lora.init`` beyond the base weights (empty for the default init); no optimizer exists yet.

    lora_ga: the adapters, a float32 gradient per target weight, the input each target's hook
    keeps until its backward (per ``lora.loraga_passes`` group), and one training
    forward/backward with the adapters disabled (``passes``: the loss and backward phases'
    activations).  loftq / pissa / olora: the adapters, plus the float32 working set of one
    matrix's SVD/QR and residual (W, residual, U, Vh, product: :data:`INIT_WORK_FACTOR` x the
    largest target, 4 bytes each) and its 4-bit replacement.
    """
    if cfg.lora.init == "default":
        return {}
    layers = linear_layers(shape)
    targets = list(tech.targets)
    largest = max(layers[n].numel for n in targets)
    adapters = sum(numels) * tech.adapter_bytes + frozen * tech.adapter_bytes
    if cfg.lora.init != "lora_ga":
        return {"lora_parameters": adapters, "init_working": INIT_WORK_FACTOR * 4 * largest + nf4_bytes(largest)}
    widths = {layers[n].group: layers[n].in_features for n in targets}
    working = max(sum(v for k, v in phase.items() if k != "autocast_adapter_copies") for phase in passes)
    return {"lora_parameters": adapters,
            "loraga_gradients": _per_pass(4 * sum(layers[n].numel for n in targets), shape, cfg, 4 * largest),
            "loraga_inputs": _per_pass(tech.s * tokens * sum(widths.values()), shape, cfg, 0),
            "loraga_forward_backward": working}


def _per_pass(per_layer: int, shape: ModelShape, cfg: Config, slack: int) -> int:
    """Bytes of one LoRA-GA gradient pass: the targets are cut into ``lora.loraga_passes`` contiguous groups of
    about equal size, so one group holds total/passes plus at most one layer (and one matrix, ``slack``)."""
    total = per_layer * shape.num_layers
    passes = cfg.lora.loraga_passes
    return total if passes == 1 else min(total, total // passes + per_layer + slack)


def fused_loss_rows(tech: Techniques, batch: int, length: int, labelled: int) -> int:
    """Positions trl's fused LM head projects: the labelled ones with Triton (CUDA), every position elsewhere."""
    return labelled if tech.device == "cuda" else batch * (length - 1)


def fused_loss_bytes(shape: ModelShape, tech: Techniques, batch: int, length: int, labelled: int) -> int:
    """Peak of trl's fused LM-head loss (``ops.loss``: ``add_fused_lm_head`` → ``ChunkedLogProbFunction``).

    With Triton (CUDA) the labelled rows of the backbone's last hidden state are copied out
    (saved) and the full hidden state is freed after the forward; elsewhere every position is
    scored from the hidden state itself (a view for one row, kept until the backward).  One
    projection buffer of ``min(rows, 4096) x 32768`` values in the compute dtype; the backward
    adds an fp32 gradient accumulator ``[rows, H]`` and its cast.  Triton folds the tile in
    place; on CPU trl folds it with torch ops, holding fp32 temporaries of tile size (3 in the
    forward, 7 + a bool mask in the backward: trl 1.16 ``_forward_tile`` / ``_backward_tile``).
    Per row a few fp32 statistics and the int64 target.
    """
    s, h, n = tech.s, shape.hidden_size, batch * length
    rows = fused_loss_rows(tech, batch, length, labelled)
    buffer = s * min(rows, LOSS_TOKEN_TILE) * LOSS_VOCAB_TILE  # allocated 32768 wide even for smaller vocabularies
    if tech.device == "cuda":
        forward = s * h * (n + rows) + buffer
        backward = (2 * s + 4) * h * rows + buffer
    else:
        tile = min(rows, LOSS_TOKEN_TILE) * min(shape.vocab_size, LOSS_VOCAB_TILE)
        copy = s * h * rows if batch > 1 and not tech.packed else 0  # [:, :-1] of one (packed) row: a view
        forward = s * h * n + copy + buffer + 3 * 4 * tile
        backward = s * h * n + copy + (s + 4) * h * rows + buffer + 29 * tile
    return max(forward, backward) + LOSS_SCALARS_PER_LABEL * rows


def fused_loss_forward_bytes(shape: ModelShape, tech: Techniques, batch: int, length: int, labelled: int) -> int:
    """The forward part of :func:`fused_loss_bytes` alone (a pass without gradients: DPO's reference)."""
    s, h, n = tech.s, shape.hidden_size, batch * length
    rows = fused_loss_rows(tech, batch, length, labelled)
    buffer = s * min(rows, LOSS_TOKEN_TILE) * LOSS_VOCAB_TILE
    if tech.device == "cuda":
        return s * h * (n + rows) + buffer + LOSS_SCALARS_PER_LABEL * rows
    tile = min(rows, LOSS_TOKEN_TILE) * min(shape.vocab_size, LOSS_VOCAB_TILE)
    copy = s * h * rows if batch > 1 and not tech.packed else 0
    return s * h * n + copy + buffer + 3 * 4 * tile + LOSS_SCALARS_PER_LABEL * rows


def activation_phases(shape: ModelShape, tech: Techniques, batch: int, length: int, labelled: int,
                      numels: list[int]) -> tuple[dict[str, int], dict[str, int], str, int]:
    """(loss-phase terms, backward-phase terms, backward peak stage, pinned host bytes)."""
    s, h, L, n = tech.s, shape.hidden_size, shape.num_layers, batch * length
    tiled = mlp_is_tiled(tech, batch, length)
    mask = attention_square(shape, tech, batch, length)[0]
    attn_part, mlp_part = layer_saved_bytes(shape, tech, batch, length)
    layout = checkpointed_layers(L, tech.every_n)
    n_ckpt = len(layout) if tech.checkpointing else 0
    resident = n_ckpt if not tech.offload else min(n_ckpt, OFFLOAD_IN_FLIGHT)
    common = {
        "step_inputs": n * (STEP_INPUT_BYTES + 2 * s * shape.head_dim),
        "checkpoints": resident * s * h * n,
        "layer_activations": (L - n_ckpt) * (attn_part + mlp_part),  # layers that are not checkpointed
        "attention_mask": mask,
    }
    per_layer_params = sum(numels) // L
    loss = {**common, "autocast_adapter_copies": s * sum(numels) if tech.autocast else 0,
            "final_norm": norm_saved_per_token(shape, tech) * n}
    if tech.fused_loss:
        loss["fused_loss"] = fused_loss_bytes(shape, tech, batch, length, labelled)
    else:
        loss["logits_and_loss"] = (s + LOSS_FP32_BYTES) * shape.vocab_size * n
    stages = backward_stages(shape, tech, batch, length, attn_part, mlp_part, tiled)
    if not tech.checkpointing or L - 1 not in layout:
        # The backward peaks at the last layer; not checkpointed, its activations are already in layer_activations
        # (a checkpointed layer further down finds one layer's activations freed for each recomputed one).
        stages = {k: {**v, "layer_recompute": 0} if k != "final_norm" else v for k, v in stages.items()}
    stage = max(stages, key=lambda k: sum(stages[k].values()))
    copies = s * per_layer_params * (L - n_ckpt + 1) if tech.autocast else 0
    backward = {**common, "autocast_adapter_copies": copies, **stages[stage]}
    host = n_ckpt * s * h * n if tech.offload else 0
    return loss, backward, stage, host


def backward_stages(shape: ModelShape, tech: Techniques, batch: int, length: int, attn_part: int, mlp_part: int,
                    tiled: bool) -> dict[str, dict[str, int]]:
    """Memory of the backward pass at its candidate peaks, beyond what the whole step keeps.

    - ``final_norm``: the final RMSNorm's backward (before any decoder layer): the scattered
      hidden-state gradients and the norm's fp32 temporaries;
    - ``mlp``: a recomputed layer's MLP backward: the layer's saved activations, the
      incoming gradient, the two ``[tokens, I]`` gradients of the down projection's input
      (base and adapter paths), a dequantised 4-bit matrix.  Tiled: one tile's
      activations and gradients, plus the MLP input and its gradient;
    - ``norm``: the post-attention RMSNorm backward (MLP activations freed): ~5 fp32
      ``[tokens, H]`` temporaries (``pow``/``mean``/``rsqrt`` backward in fp32);
    - ``attention``: the attention backward: the kernel's buffers (:func:`flash_backward_per_token`).
    """
    s, h, i, n = tech.s, shape.hidden_size, shape.intermediate_size, batch * length
    dequant = max(lin.numel for lin in linear_layers(shape).values()) * s
    grad = s * h * n  # the gradient arriving at the layer (or the norm)
    norm_temps = NORM_BACKWARD_FP32_COPIES * 4 * h * n
    final = {"final_norm": norm_saved_per_token(shape, tech) * n, "backward_working": 2 * grad + norm_temps}
    if tiled:
        rows = batch * MLP_TILE_TOKENS if not tech.packed else MLP_TILE_TOKENS
        mlp_work = 2 * grad + mlp_tile_per_token(shape, tech) * rows
    else:
        mlp_work = grad + 2 * s * i * n
    attention_work = grad + s * shape.q_dim * n + flash_backward_per_token(shape, tech) * n
    if tech.attention in ("eager", "math"):
        square = (batch * length) ** 2 if tech.packed else batch * length * length
        attention_work += square * shape.num_heads * (4 + tech.s)  # gradients of the scores
    norm2 = norm_saved_per_token(shape, tech) * n
    return {
        "final_norm": final,
        "mlp": {"layer_recompute": attn_part + mlp_part, "backward_working": mlp_work, "dequant_buffer": dequant},
        "norm": {"layer_recompute": attn_part + norm2, "backward_working": 2 * grad + norm_temps},
        "attention": {"layer_recompute": attn_part, "backward_working": attention_work, "dequant_buffer": dequant},
    }


def fragmentation_fraction() -> float:
    """Allocator margin: smaller with ``expandable_segments`` (what ``train`` sets unless the user chose)."""
    import os

    conf = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    if conf and "expandable_segments:true" not in conf.replace(" ", "").lower():
        return FRAGMENTATION_LEGACY
    return FRAGMENTATION_EXPANDABLE
