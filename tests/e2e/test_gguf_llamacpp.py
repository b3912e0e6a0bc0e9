"""`export --format gguf` checked by llama.cpp itself (llama-cpp-python, the optional [llamacpp] extra).

Slow: llama-cpp-python compiles llama.cpp on install, so it is in neither the default install
nor the default test run; CI installs it in its slow step.  Every test here skips without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import require_demo_gguf
from run_fixture import make_run

from qlora_kit.export import gguf_file
from qlora_kit.export.card import REPORT
from qlora_kit.export.command import export_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"), pytest.mark.e2e]


llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (extra [llamacpp]) is not installed")


def _export(run: Path, out: Path, quant: str, **kwargs) -> tuple[int, dict]:
    code = export_run(run, out, fmt="gguf", quant=quant, show_progress=False, verify_prompts=4, **kwargs)
    return code, json.loads((out / REPORT).read_text())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_llamacpp_runs_the_export_like_the_trained_model(arch: str, tmp_path: Path) -> None:
    """Tokenisation, teacher-forced logits and chat answers in llama.cpp agree with NF4 + adapter."""
    run = make_run(tmp_path / "r", arch, n_heldout=4)
    code, report = _export(run, tmp_path / "out", "q8_0")
    ver = report["verification"]
    assert code == 0 and ver["status"] == "passed", ver["failures"]
    assert ver["llama_cpp"].startswith("ran (llama-cpp-python") and ver["backend"] == "llama.cpp"
    assert ver["tokenization"] == {"identical": 4, "total": 4, "chat_prompt_lengths_identical": 4}
    assert ver["greedy"]["greedy_diverged"] == 0
    m = ver["next_token"]
    assert 0 < m["rel_max"] <= m["tolerance"]["rel_max"] and m["decisive_agreement"] == 1.0


def test_k_quants_come_from_llamacpps_quantiser(tmp_path: Path) -> None:
    """q4_k_m / q6_k on a model whose rows split into 256-wide super-blocks: real K-quant tensors, verified."""
    run = make_run(tmp_path / "r", "llama", n_heldout=4,
                   model_overrides={"hidden_size": 256, "intermediate_size": 512})
    sizes = {}
    for quant, kinds in (("q4_k_m", {"Q4_K", "Q6_K"}), ("q6_k", {"Q6_K"})):
        code, report = _export(run, tmp_path / quant, quant)
        assert code == 0 and report["verification"]["status"] == "passed", report["verification"]["failures"]
        types = report["gguf"]["tensor_types"]
        assert kinds <= set(types) and "F16" not in types, types
        assert report["gguf"]["quantizer"].startswith("llama.cpp llama_model_quantize")
        assert [p.name for p in (tmp_path / quant).glob("*.gguf")] == [f"{quant}-{quant.upper()}.gguf"]
        sizes[quant] = report["bytes_written"]
    _, q8 = _export(run, tmp_path / "q8_0", "q8_0", verify=False)
    assert sizes["q4_k_m"] < sizes["q6_k"] < q8["bytes_written"]


def test_llamacpp_catches_a_wrong_rope_permutation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_file, "permute_for_rope", lambda t, n_head: t)
    code, report = _export(make_run(tmp_path / "r", "llama", n_heldout=4), tmp_path / "out", "f16")
    assert code == 5 and report["verification"]["status"] == "failed"


def test_smollm2_trained_exported_to_f16_and_q8_0_answers_like_the_hf_export(tmp_path: Path) -> None:
    """The real model: train briefly on the demo task, export HF + GGUF, compare llama.cpp's answers with HF's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.commands import demo
    from qlora_kit.inference.chat import encode_chat, eos_token_ids, strip_stop
    from qlora_kit.inference.generation import generate_tokens
    from qlora_kit.train.recipe import run_training

    require_demo_gguf()
    torch.set_num_threads(2)
    train_path, heldout_path = demo.make_demo_data(tmp_path / "data", n_heldout=8)
    run = tmp_path / "run"
    overrides = demo.demo_overrides(train_path, heldout_path, run, steps=10)
    assert run_training(demo.find_demo_config(), overrides, resume=False, overwrite=False,
                        skip_memory_check=True) == 0
    assert export_run(run, tmp_path / "hf", show_progress=False, verify=False) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    eos = eos_token_ids(tok, model.generation_config.eos_token_id)
    prompts = [demo.split_reference(row)[0] for row in demo.read_jsonl(heldout_path)]
    hf_answers = [tok.decode(strip_stop(ids, eos), skip_special_tokens=True).strip() for ids in
                  generate_tokens(model, [encode_chat(tok, p) for p in prompts], eos, tok.pad_token_id, 24)]
    del model
    for quant in ("f16", "q8_0"):
        code = export_run(run, tmp_path / quant, fmt="gguf", quant=quant, show_progress=False, verify_prompts=8)
        report = json.loads((tmp_path / quant / REPORT).read_text())
        ver = report["verification"]
        assert code == 0 and ver["status"] == "passed", (quant, ver["failures"])
        assert ver["llama_cpp"].startswith("ran") and ver["tokenization"]["identical"] == 8
        assert report["modelfile"]["family"] == "chatml" and report["gguf"]["tokenizer_pre"] == "gpt-2"
        llamacpp_answers = [e["llama_cpp"] for e in ver["greedy"]["examples"]]
        same = sum(a == b for a, b in zip(hf_answers, llamacpp_answers))
        # answers may differ only where the reference itself was at a near-tie (verification counts those)
        assert same >= 8 - ver["greedy"]["greedy_near_tie"], (quant, hf_answers, llamacpp_answers)
        assert all(e["llama_cpp_finish"] == "stop" for e in ver["greedy"]["examples"]), ver["greedy"]["examples"]
        modelfile = (tmp_path / quant / "Modelfile").read_text()
        assert 'PARAMETER stop "<|im_end|>"' in modelfile and "<|im_start|>assistant" in modelfile
