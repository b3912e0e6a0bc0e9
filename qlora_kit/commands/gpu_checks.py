"""The checks of ``qlora-kit doctor --gpu``: every GPU path of a run, end to end, against a reference.

Each check is a function of a :class:`Rig` (the device, the compute dtype the card trains in,
and a small Llama-shaped model built in code, once) returning table rows: what was compared,
the measured difference and the tolerance it must stay within.  A check raises
:class:`NotApplicable` where the path does not run on this card (e.g. the fp16 loss scaler on
a card with native bf16).  The runner (``commands/doctor_gpu.py``) turns any other exception
into a failed row with the check's ``fix:``.

The checks are written for CUDA but run wherever their kernels exist, so their CPU parts
are tested on machines without a GPU (tests/unit/commands/test_doctor_gpu_checks.py).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qlora_kit.core.config import Config
from qlora_kit.model.tiny import tiny_config
from qlora_kit.ops import selfcheck
from qlora_kit.ops.checkpointing import every_n_for
from qlora_kit.ops.loss import causal_lm_loss, count_targets
from qlora_kit.ops.packing import flash_varlen, flash_varlen_runs, sdpa_per_sample
from qlora_kit.ops.precision import native_bf16, resolve_precision
from qlora_kit.plan.estimate import estimate
from qlora_kit.plan.shape import load_shape_file
from qlora_kit.train.builders import build_model, build_optimizer
from qlora_kit.train.startup_checks import check_batch, custom_paths

PASSED, FAILED, NOT_APPLICABLE = "passed", "failed", "not applicable"
REPORT = "report it with the JSON of `qlora-kit doctor --gpu --json FILE` (README: First run on a new GPU)"

# The small model: Llama-shaped, head_dim 64 (what the flash kernels serve), 4 layers so a sparse
# checkpoint layout (3 of 4) exists; on CUDA big enough that activations dominate the planner's check.
GPU_SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=4096)
CPU_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024)
NF4_ROUNDTRIP_TOLERANCE = 0.12  # relative RMS error of NF4 (block 64) on Gaussian weights: 0.092 measured
MATMUL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # 4-bit matmul vs dequantised
OPTIMIZER_TOLERANCE = {"adamw_torch": 1e-4, "adamw_8bit": 1e-2, "paged_adamw_8bit": 1e-2}  # |step - ref| / lr
PLANNER_TOLERANCE = 0.20  # measured / predicted peak - 1
CHECK_TOKENS = 1024  # the model-level comparisons: the start-up check's, on a longer packed row


class NotApplicable(Exception):
    """The path does not run on this card (the message says why)."""


@dataclass
class Row:
    """One line of the table."""

    path: str
    result: str
    difference: float | None = None
    tolerance: float | None = None
    seconds: float = 0.0
    detail: str = ""
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "result": self.result, "difference": _finite(self.difference),
                "tolerance": self.tolerance, "seconds": round(self.seconds, 3), "detail": self.detail,
                "fix": self.fix}


def measured(path: str, difference: float, tolerance: float, detail: str = "") -> Row:
    """A row that passes when ``difference`` is within ``tolerance``."""
    return Row(path, PASSED if difference <= tolerance else FAILED, difference, tolerance, detail=detail)


@dataclass
class Rig:
    """What every check shares: the device, its compute dtype, and the small model's directory (built once)."""

    device: torch.device
    compute_dtype: torch.dtype
    shape: dict[str, int] = field(default_factory=lambda: dict(GPU_SHAPE))
    workdir: Path | None = None
    _model_dir: Path | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @classmethod
    def for_device(cls, device: torch.device) -> "Rig":
        """The rig of ``device``: bf16 where native, else fp16 on CUDA; fp32 with a tiny shape on CPU."""
        if device.type != "cuda":
            return cls(device, torch.float32, dict(CPU_SHAPE))
        return cls(device, torch.bfloat16 if native_bf16(device) else torch.float16)

    @property
    def dtype_name(self) -> str:
        return str(self.compute_dtype).removeprefix("torch.")

    def model_dir(self) -> Path:
        """A random model of :attr:`shape` saved in the compute dtype (safetensors), built on first use."""
        if self._model_dir is None:
            from transformers import AutoModelForCausalLM

            root = self.workdir or Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="qlora-doctor-")))
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config("llama", **self.shape), dtype=self.compute_dtype)
            model.save_pretrained(root / "model")
            self._model_dir = root / "model"
        return self._model_dir

    def config(self, **train: Any) -> Config:
        """A run's config for the small model with every path of ours on (what ``auto`` picks at long lengths)."""
        layers = self.shape["num_hidden_layers"]
        return Config.model_validate({
            "model": {"name_or_path": str(self.model_dir()), "compute_dtype": self.dtype_name},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "data": {"path": "unused.jsonl"}, "output_dir": "unused",
            "train": {"fused_loss": True, "tiled_mlp": True, "activation_offload": self.device.type == "cuda",
                      "checkpoint_every_n_layers": every_n_for(layers, layers - 1), "optimizer": "adamw_torch",
                      "micro_batch_size": 1, "max_length": 2048, **train},
        })

    def precision(self) -> Any:
        return resolve_precision(self.compute_dtype, "float32", self.device)

    def close(self) -> None:
        self._stack.close()


# --------------------------------------------------------------------------- bitsandbytes


def check_nf4_roundtrip(rig: Rig) -> list[Row]:
    """NF4 quantise → dequantise on the card: the error NF4 makes, and the CPU's result for the same weight."""
    import bitsandbytes.functional as bnbf

    weight = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).to(rig.compute_dtype)
    packed, state = bnbf.quantize_4bit(weight.to(rig.device), quant_type="nf4", blocksize=64, compress_statistics=True)
    back = bnbf.dequantize_4bit(packed, state).float().cpu()
    error = float((back - weight.float()).pow(2).mean().sqrt() / weight.float().pow(2).mean().sqrt())
    detail = f"relative RMS error {error:.3f} (NF4 makes ~0.09)"
    if rig.device.type == "cuda":  # the same weight quantised by the CPU kernels: the same codes
        cpu_packed, cpu_state = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=True)
        cpu_back = bnbf.dequantize_4bit(cpu_packed, cpu_state).float()
        agree = float((back - cpu_back).abs().max() / weight.float().abs().max())
        detail += f"; the CPU's dequantised weight differs by {agree:.1e}"
        error = max(error, agree)
    return [measured("nf4 quantise/dequantise", error, NF4_ROUNDTRIP_TOLERANCE, detail)]


def check_4bit_matmul(rig: Rig) -> list[Row]:
    """bitsandbytes' 4-bit matmul, forward and input gradient, against the dequantised weight's matmul."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(768, 512, generator=g).to(device=rig.device, dtype=rig.compute_dtype)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    dense = bnbf.dequantize_4bit(packed, state).to(rig.compute_dtype)
    x = torch.randn(64, 512, generator=g).to(device=rig.device, dtype=rig.compute_dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(64, 768, generator=g).to(device=rig.device, dtype=rig.compute_dtype)
    y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    y.backward(grad_out)
    ref = x_ref @ dense.t()
    ref.backward(grad_out)
    diff = max(_relative(y, ref), _relative(x.grad, x_ref.grad))
    return [measured("nf4 4-bit matmul (+ input gradient)", diff, MATMUL_TOLERANCE[rig.compute_dtype],
                     f"against x @ dequantised W in {rig.dtype_name}")]


# --------------------------------------------------------------------------- precision


def check_autocast_fp32_masters(rig: Rig) -> list[Row]:
    """One LoRA layer of the run's model under the run's autocast: 16-bit activations, fp32 adapters and
    gradients, output and adapter gradients equal to the same layer computed in fp32."""
    precision = rig.precision()
    if not precision.autocast:
        raise NotApplicable(f"{rig.dtype_name} compute: no autocast")
    return [_layer_against_fp32(rig, precision, "bf16 autocast, fp32 adapter masters", scaler=None)]


def check_fp16_loss_scaling(rig: Rig) -> list[Row]:
    """Cards without native bf16 compute in fp16 with a GradScaler: scaled gradients unscale to the fp32 ones,
    and a step with an inf gradient is skipped with the scale halved."""
    if rig.compute_dtype != torch.float16:
        raise NotApplicable(f"this card computes in {rig.dtype_name}: no loss scaling")
    precision = rig.precision()
    scaler = precision.make_scaler()
    row = _layer_against_fp32(rig, precision, "fp16 autocast + GradScaler", scaler=scaler)
    param = torch.nn.Parameter(torch.zeros(4, device=rig.device))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scale = scaler.get_scale()
    scaler.scale(param.sum() * 0).backward()
    param.grad.fill_(float("inf"))
    scaler.step(optimizer)
    scaler.update()
    if scaler.get_scale() >= scale or bool(param.detach().ne(0).any()):
        return [Row(row.path, FAILED, row.difference, row.tolerance,
                    detail="an inf gradient was not skipped by the scaler (or the scale did not drop)")]
    row.detail += "; an inf gradient's step was skipped and the scale halved"
    return [row]


def _layer_against_fp32(rig: Rig, precision: Any, path: str, scaler: Any) -> Row:
    from peft.tuners.lora import LoraLayer

    model = build_model(rig.config(tiled_mlp=False, activation_offload=False), rig.model_dir(), precision)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A)
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_b.normal_(std=0.02, generator=torch.Generator(device=rig.device).manual_seed(2))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, lora_a.shape[1], generator=g).to(device=rig.device, dtype=rig.compute_dtype)
    grad_out = torch.randn(32, lora_b.shape[0], generator=g).to(rig.device)
    seen: list[torch.dtype] = []
    hook = layer.lora_A["default"].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    for _ in range(32):  # dynamic loss scaling as in training: an overflowing scale is halved and the step redone
        lora_a.grad = lora_b.grad = None
        seen.clear()
        with precision.forward_context():
            y = layer(x)
        loss = (y.float() * grad_out).sum()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        got_a, got_b = lora_a.grad.float() / scale, lora_b.grad.float() / scale
        if scaler is None or bool(torch.isfinite(got_a).all() and torch.isfinite(got_b).all()):
            break
        scaler.update(new_scale=scale / 2)
    hook.remove()
    dtypes_ok = lora_a.dtype == lora_b.dtype == lora_a.grad.dtype == torch.float32 and seen == [rig.compute_dtype]
    import bitsandbytes.functional as bnbf

    base = layer.get_base_layer()
    dense = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    a32, b32 = lora_a.detach().clone().requires_grad_(), lora_b.detach().clone().requires_grad_()
    x32 = x.float()
    ref = x32 @ dense.t() + layer.scaling["default"] * (x32 @ a32.t()) @ b32.t()
    (ref * grad_out).sum().backward()
    diff = max(_relative(y.float(), ref), _relative(got_a, a32.grad), _relative(got_b, b32.grad))
    row = measured(path, diff, selfcheck.tolerance_for(rig.compute_dtype).gradients,
                   f"adapter input {seen[0] if seen else '?'}, adapters and gradients {lora_a.grad.dtype}")
    if not dtypes_ok:
        row.result = FAILED
        row.detail = f"dtypes: adapter input {seen}, adapters {lora_a.dtype}/{lora_b.dtype}, grads {lora_a.grad.dtype}"
    return row


# --------------------------------------------------------------------------- attention kernel


def check_varlen_kernel(rig: Rig) -> list[Row]:
    """torch's varlen flash attention against causal SDPA per sample: outputs and q/k/v gradients, GQA."""
    if not flash_varlen_runs(rig.device, rig.compute_dtype, 64):
        raise NotApplicable("no varlen flash kernel here: packed attention runs SDPA per sample")
    g = torch.Generator().manual_seed(4)
    lengths = [700, 1, 300, 1024, 23]
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, 64, generator=g).to(device=rig.device, dtype=rig.compute_dtype) for h in (8, 2, 2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=rig.device)
    grad_out = torch.randn(n, 8, 64, generator=g).to(device=rig.device, dtype=rig.compute_dtype)
    results = []
    for run in (lambda a, b, c: flash_varlen(a, b, c, cu, max(lengths), None, None),
                lambda a, b, c: sdpa_per_sample(a, b, c, lengths, None, None)):
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = run(*inputs)
        out.backward(grad_out)
        results.append([out, *(t.grad for t in inputs)])
    diff = max(_relative(a, b) for a, b in zip(*results))
    return [measured("varlen flash attention vs per-sample SDPA", diff,
                     selfcheck.tolerance_for(rig.compute_dtype).gradients,
                     f"{len(lengths)} packed samples, 8 query / 2 kv heads; output and q, k, v gradients")]


# --------------------------------------------------------------------------- the run's paths, end to end


def check_model_paths(rig: Rig) -> list[Row]:
    """The start-up check of a run on the small model with every path of ours on, on a packed row."""
    cfg, precision = rig.config(), rig.precision()
    model = build_model(cfg, rig.model_dir(), precision)
    g = torch.Generator().manual_seed(5)
    vocab = rig.shape["vocab_size"]
    samples = [{"input_ids": (ids := torch.randint(3, vocab, (n,), generator=g).tolist()),
                "labels": [-100] * (n // 2) + ids[n // 2:]} for n in (700, 300, 500)]
    batch = {k: v.to(rig.device) if isinstance(v, torch.Tensor) else v
             for k, v in check_batch(samples, [[0, 1, 2]], 0, True, CHECK_TOKENS).items()}
    n_items = count_targets(batch["labels"])

    def loss_fn(fused: bool) -> torch.Tensor:
        with precision.forward_context():
            return causal_lm_loss(model, batch, n_items, fused)

    paths, skipped = custom_paths(cfg, model, precision)
    scale = selfcheck.FP16_BACKWARD_SCALE if rig.compute_dtype == torch.float16 else 1.0
    tol = selfcheck.tolerance_for(rig.compute_dtype)
    rows = []
    for outcome in [*selfcheck.compare_paths(model, loss_fn, paths, rig.compute_dtype, scale), *skipped]:
        name = f"{outcome.name} vs {outcome.reference}" if outcome.reference else outcome.name
        if outcome.status == selfcheck.NOT_APPLICABLE:
            rows.append(Row(name, NOT_APPLICABLE, detail=outcome.reason or ""))
        elif outcome.error or outcome.status == selfcheck.UNCHECKED:
            rows.append(Row(name, FAILED, detail=outcome.error or outcome.reason or ""))
        else:
            rows.append(Row(name, PASSED if outcome.status == selfcheck.PASSED else FAILED, outcome.grad_diff,
                            tol.gradients, outcome.seconds,
                            f"loss {outcome.loss_diff:.1e} (tolerance {tol.loss:g}), gradients"))
    return rows


# --------------------------------------------------------------------------- optimizers


def check_optimizers(rig: Rig) -> list[Row]:
    """One step of each optimizer ``auto`` can pick, as the run builds it, against torch's reference AdamW."""
    g = torch.Generator().manual_seed(6)
    start, grad = torch.randn(256, 64, generator=g), torch.randn(256, 64, generator=g)  # 8-bit from 4,096 values
    lr = 1e-3
    reference = torch.nn.Parameter(start.clone())
    ref_opt = torch.optim.AdamW([reference], lr=lr, weight_decay=0.01, foreach=False, fused=False)
    reference.grad = grad.clone()
    ref_opt.step()
    want = reference.detach() - start
    rows = []
    for name, tolerance in OPTIMIZER_TOLERANCE.items():
        param = torch.nn.Parameter(start.clone().to(rig.device))
        cfg = rig.config(optimizer=name, learning_rate=lr, weight_decay=0.01)
        optimizer = build_optimizer(cfg, [param], rig.device)
        param.grad = grad.clone().to(rig.device)
        optimizer.step()
        got = param.detach().float().cpu() - start
        detail = f"{type(optimizer).__name__}" + (" (fused)" if optimizer.defaults.get("fused") else "")
        rows.append(measured(f"optimizer {name}: one step", float((got - want).abs().max()) / lr, tolerance,
                             detail + ", |step - AdamW step| / lr"))
    return rows


# --------------------------------------------------------------------------- the planner


def check_planner(rig: Rig) -> list[Row]:
    """Two training steps of the small model at 2,048 packed tokens: torch's measured peak against the plan."""
    if rig.device.type != "cuda":
        raise NotApplicable("measures CUDA memory")
    cfg, precision = rig.config(activation_offload=False), rig.precision()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(rig.device)
    torch.cuda.reset_peak_memory_stats(rig.device)
    before = torch.cuda.memory_allocated(rig.device)
    model = build_model(cfg, rig.model_dir(), precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params, rig.device)
    g = torch.Generator().manual_seed(7)
    lengths = (900, 600, 548)
    samples = [{"input_ids": (ids := torch.randint(3, rig.shape["vocab_size"], (n,), generator=g).tolist()),
                "labels": [-100] + ids[1:]} for n in lengths]
    batch = {k: v.to(rig.device) if isinstance(v, torch.Tensor) else v
             for k, v in check_batch(samples, [[0, 1, 2]], 0, True, sum(lengths) * 2).items()}
    for _ in range(2):
        with precision.forward_context():
            loss = causal_lm_loss(model, batch, count_targets(batch["labels"]), True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(rig.device)
    peak = torch.cuda.max_memory_allocated(rig.device) - before
    plan = estimate(cfg, load_shape_file(rig.model_dir() / "config.json"), max_length=sum(lengths))
    predicted = plan.torch_allocated_peak
    del model, optimizer, params
    torch.cuda.empty_cache()
    return [measured("planner: predicted vs measured peak", abs(peak / predicted - 1), PLANNER_TOLERANCE,
                     f"measured {peak / 2**20:.0f} MiB, predicted {predicted / 2**20:.0f} MiB "
                     f"({plan.peak_phase} phase, {sum(lengths)} tokens)")]


# --------------------------------------------------------------------------- the list


Check = Callable[[Rig], list[Row]]
CHECKS: list[tuple[str, Check, str]] = [  # (name, check, fix when it fails)
    ("nf4 quantise/dequantise", check_nf4_roundtrip,
     "pip install --force-reinstall 'bitsandbytes>=0.46' (`python -m bitsandbytes` shows which kernels loaded); "
     "qlora-kit cannot train on this card until this passes"),
    ("nf4 4-bit matmul", check_4bit_matmul,
     "pip install --force-reinstall 'bitsandbytes>=0.46'; `python -m bitsandbytes` shows what failed to load"),
    ("bf16 autocast, fp32 adapter masters", check_autocast_fp32_masters,
     "train with --set lora.adapter_dtype=bfloat16 (no autocast) until it is fixed; " + REPORT),
    ("fp16 loss scaling", check_fp16_loss_scaling,
     "update torch; on this card keep train.on_nonfinite=stop; " + REPORT),
    ("varlen flash attention", check_varlen_kernel,
     "runs switch packed attention off by themselves (start-up check); update torch, or set "
     "model.attn_implementation=eager; " + REPORT),
    ("run paths", check_model_paths,
     "runs switch a failing path off by themselves (start-up check; the config key of each path turns it off "
     "for good: train.fused_loss / tiled_mlp / activation_offload / checkpoint_every_n_layers=1); " + REPORT),
    ("optimizers", check_optimizers,
     "set train.optimizer to one that passed (adamw_torch or adamw_8bit); " + REPORT),
    ("planner", check_planner,
     "leave headroom: plan with `qlora-kit plan CONFIG --gpu-memory <a few GiB less>`; " + REPORT),
]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in fp32 (inf when not finite)."""
    got, want = got.detach().float(), want.detach().float()
    value = float((got - want).norm() / want.norm().clamp_min(1e-30))
    return value if value == value else float("inf")


def _finite(value: float | None) -> float | str | None:
    if value is None:
        return None
    return value if value not in (float("inf"), float("-inf")) else "inf"
