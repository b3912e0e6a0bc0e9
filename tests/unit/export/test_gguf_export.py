"""`qlora-kit export --format gguf` without llama.cpp: tensors, tokenizer, quantisation bounds, Modelfile, refusals.

The checks that need llama.cpp itself (llama-cpp-python, compiled) are in test_gguf_llamacpp.py
(slow).  Here the GGUF is read back with the gguf package and transformers' GGUF loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from run_fixture import make_run
from safetensors import safe_open

from qlora_kit.core.errors import ModelError, QloraKitError
from qlora_kit.export import gguf_file, llamacpp, merge
from qlora_kit.export.card import REPORT
from qlora_kit.export.command import export_run
from qlora_kit.export.gguf_vocab import PRE_TOKENIZERS, pre_tokenizer_name, read_gguf_vocab
from qlora_kit.export.verify_gguf import load_gguf_with_transformers
from qlora_kit.rundir.finished import read_run

pytestmark = pytest.mark.usefixtures("one_thread")


ARCHS = ["llama", "qwen2", "mistral"]


@pytest.fixture
def no_llamacpp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave as a default install: llama-cpp-python absent."""
    monkeypatch.setattr(llamacpp, "available", lambda: False)


def _export_gguf(run: Path, out: Path, quant: str, verify: bool = False) -> tuple[int, Path]:
    code = export_run(run, out, fmt="gguf", quant=quant, verify=verify, show_progress=False, verify_prompts=4)
    files = list(out.glob("*.gguf"))
    assert len(files) == 1, files
    return code, files[0]


def _rope_layout(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order, written out row by row: head h, pair i → rows (h·d + i, h·d + d/2 + i)."""
    d = t.shape[0] // n_head
    order = [h * d + half * (d // 2) + i for h in range(n_head) for i in range(d // 2) for half in (0, 1)]
    return t[order]


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_reads_back_tensor_equal_to_the_hf_export(arch: str, runs, tmp_path: Path) -> None:
    """Every matrix of the f16 GGUF is bit-equal to the HF fp16 export; q/k are in llama.cpp's RoPE order."""
    run = runs(arch)
    assert export_run(run, tmp_path / "hf", verify=False, show_progress=False) == 0
    code, path = _export_gguf(run, tmp_path / "gguf", "f16")
    assert code == 0
    assert {p.name for p in (tmp_path / "gguf").iterdir()} == {path.name, "Modelfile", "README.md", REPORT}
    back = load_gguf_with_transformers(path, read_run(run).source_dir, torch.device("cpu")).state_dict()
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as fh:
        names = list(fh.keys())
        for name in names:
            exported = fh.get_tensor(name)
            mine = back[name].to(exported.dtype) if exported.dim() == 1 else back[name]  # 1-D tensors stay F32
            assert torch.equal(mine.float(), exported.float()), name
        reader = gguf.GGUFReader(path)
        raw = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        q = fh.get_tensor("model.layers.1.self_attn.q_proj.weight")
        k = fh.get_tensor("model.layers.1.self_attn.k_proj.weight")
    permuted = arch in ("llama", "mistral")
    want_q = _rope_layout(q, config["num_attention_heads"]) if permuted else q
    want_k = _rope_layout(k, config["num_key_value_heads"]) if permuted else k
    assert torch.equal(raw["blk.1.attn_q.weight"], want_q) and torch.equal(raw["blk.1.attn_k.weight"], want_k)
    assert raw["blk.1.attn_q.weight"].dtype == torch.float16 and raw["output_norm.weight"].dtype == torch.float32
    report = json.loads((tmp_path / "gguf" / REPORT).read_text())
    assert report["gguf"]["permuted_qk"] is permuted and report["verification"] == {"status": "skipped"}


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_is_within_its_error_bound(arch: str, runs, tmp_path: Path) -> None:
    """Each Q8_0 block holds round(x / d) with d = max|x| / 127 stored in fp16: |error| ≤ d (1/2 + 127·2^-11)."""
    run = runs(arch)
    code, path = _export_gguf(run, tmp_path / "q8", "q8_0")
    assert code == 0
    info = read_run(run)
    ctx = merge.MergeContext("dequantized", info.quant, torch.float32, torch.device("cpu"), torch.device("cpu"))
    exact = {job.src.name: t.clone() for job, t in merge.merged_tensors(merge.plan_export(info, torch.float32), ctx)}
    config = json.loads((info.source_dir / "config.json").read_text())
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA, 2)
    checked = 0
    for name, x in exact.items():
        t = stored[names.get_name(name, try_suffixes=(".weight", ".bias"))]
        if x.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(np.array(t.data), x.numpy())
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        if arch != "qwen2" and ".q_proj." in name:
            x = _rope_layout(x, config["num_attention_heads"])
        elif arch != "qwen2" and ".k_proj." in name:
            x = _rope_layout(x, config["num_key_value_heads"])
        back = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type)).reshape(x.shape)
        blocks, errors = x.reshape(-1, 32), (back - x).abs().reshape(-1, 32)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        assert bool((errors <= d * (0.5 + 127 * 2.0**-11) + 1e-12).all()), name
        assert float(errors.max()) > 0  # really quantised
        checked += 1
    assert checked == 16  # 7 projections x 2 layers, embeddings, lm_head


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trip(arch: str, runs, tmp_path: Path) -> None:
    """Vocabulary, merges, special ids, template and pre-tokenizer read back as the run's tokenizer has them."""
    from transformers import AutoTokenizer

    from qlora_kit.inference.chat import render_chat

    run = runs(arch)
    _, path = _export_gguf(run, tmp_path / "g", "f16")
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    spec = json.loads((run / "tokenizer" / "tokenizer.json").read_text())
    meta = read_gguf_vocab(path)
    # transformers 5 gives a Qwen2Tokenizer Qwen's own split regex: the GGUF names what the run really uses
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == ("qwen2" if arch == "qwen2" else "gpt-2")
    assert meta["tokenizer.ggml.tokens"][: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.add_bos_token"] is False
    control = {i for i, kind in enumerate(meta["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL}
    assert control == {t["id"] for t in spec["added_tokens"] if t["special"]} >= set(tok.all_special_ids)
    if arch == "qwen2":
        return  # transformers' qwen2 GGUF tokenizer always applies Qwen's own pre-tokenizer, ignoring ggml.pre
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = render_chat(tok, [{"role": "user", "content": "what is 12 + 7 ? say it twice , please !"}])
    for sample in (text, "hello  world\n\nthe 3rd of may , 1987", "ünïcode ✓ and   spaces"):
        assert back(sample, add_special_tokens=False)["input_ids"] == tok(sample, add_special_tokens=False)["input_ids"]


def _pre_tokenizer_spec(pre) -> dict:
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return json.loads(tok.to_str())


def test_pre_tokenizer_is_read_from_the_tokenizer_not_the_model_name() -> None:
    """Serialised `tokenizers` pre-tokenizers map to llama.cpp's names; anything else is refused."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    def split_then_bytes(regex: str):
        return pt.Sequence([pt.Split(Regex(regex), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    cases = {
        "gpt-2": pt.ByteLevel(add_prefix_space=False),
        "smollm": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
        "llama-bpe": split_then_bytes(PRE_TOKENIZERS["llama-bpe"][0]["pattern"]["Regex"]),
        "qwen2": split_then_bytes(PRE_TOKENIZERS["qwen2"][0]["pattern"]["Regex"]),
    }
    for name, pre in cases.items():
        assert pre_tokenizer_name(_pre_tokenizer_spec(pre)) == name
    for bad in (pt.ByteLevel(add_prefix_space=True), pt.Whitespace(), split_then_bytes(r"\p{L}+")):
        with pytest.raises(ModelError, match="llama.cpp would split text differently"):
            pre_tokenizer_name(_pre_tokenizer_spec(bad))


@pytest.mark.parametrize("arch", ARCHS)
def test_default_gguf_export_verifies_with_transformers_when_llamacpp_is_missing(arch: str, runs, tmp_path: Path,
                                                                                 no_llamacpp) -> None:
    out = tmp_path / "out"
    code = export_run(runs(arch), out, fmt="gguf", show_progress=False, verify_prompts=4)
    report = json.loads((out / REPORT).read_text())
    ver = report["verification"]
    assert code == 0 and ver["status"] == "passed", ver["failures"]
    assert report["gguf"]["quant"] == "q8_0" and report["gguf"]["quantizer"] == "gguf-py numpy quantisers"
    assert ver["llama_cpp"].startswith("did not run") and '".[llamacpp]"' in ver["llama_cpp"]
    assert ver["tokenizer_metadata"]["identical"] and ver["greedy"]["greedy_diverged"] == 0
    m = ver["next_token"]
    assert 0 < m["rel_max"] <= m["tolerance"]["rel_max"] and m["kl_mean"] <= m["tolerance"]["kl_mean"]
    readme = (out / "README.md").read_text()
    assert "ollama create" in readme and "did not run" in readme


def test_verification_catches_a_wrong_rope_permutation(runs, tmp_path: Path, no_llamacpp,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k left in transformers' layout: the read-back model is wrong, and the export exits 5."""
    monkeypatch.setattr(gguf_file, "permute_for_rope", lambda t, n_head: t)
    out = tmp_path / "out"
    assert export_run(runs("llama"), out, fmt="gguf", quant="f16", show_progress=False, verify_prompts=4) == 5
    ver = json.loads((out / REPORT).read_text())["verification"]
    assert ver["status"] == "failed" and any("logit std" in f for f in ver["failures"])


def test_verification_catches_a_gguf_without_the_fine_tune(runs, tmp_path: Path, no_llamacpp,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter never merged ("no LoRA effect"): as far from the trained model as the untuned base, exit 5."""
    out = tmp_path / "ok"
    assert export_run(runs("llama"), out, fmt="gguf", quant="f16", show_progress=False, verify_prompts=4) == 0
    kept = json.loads((out / REPORT).read_text())["verification"]["untuned"]
    assert kept["judged"] and kept["ratio"] < 0.01, kept
    monkeypatch.setattr(merge, "apply_adapter", lambda w, mod, factors, dora: w)
    out = tmp_path / "lost"
    assert export_run(runs("llama"), out, fmt="gguf", quant="f16", show_progress=False, verify_prompts=4) == 5
    ver = json.loads((out / REPORT).read_text())["verification"]
    assert ver["untuned"]["judged"] and ver["untuned"]["ratio"] > 0.9, ver["untuned"]
    assert any("fine-tune is largely lost" in f for f in ver["failures"]), ver["failures"]
    assert "fine-tune LOST" in (out / "README.md").read_text()


def test_modelfile_has_template_stops_and_the_gguf(runs, tmp_path: Path) -> None:
    out = tmp_path / "mf"
    _, path = _export_gguf(runs("qwen2"), out, "f16")
    text = (out / "Modelfile").read_text()
    assert f"FROM ./{path.name}" in text and 'TEMPLATE """' in text and "<|im_start|>assistant" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert json.loads((out / REPORT).read_text())["modelfile"]["family"] == "chatml"


def test_other_architectures_are_refused_in_one_line(tmp_path: Path) -> None:
    run = make_run(tmp_path / "g", "gemma", model_overrides={"tie_word_embeddings": True}, n_heldout=2)
    with pytest.raises(ModelError, match="GGUF export supports the Llama, Mistral and Qwen2 families") as err:
        export_run(run, tmp_path / "out", fmt="gguf", show_progress=False)
    assert "--format hf" in err.value.hint and not (tmp_path / "out").exists()


def test_k_quants_without_llamacpp_name_the_extra(runs, tmp_path: Path, no_llamacpp) -> None:
    for quant in gguf_file.LLAMACPP_QUANTS:
        with pytest.raises(QloraKitError, match="llama.cpp") as err:
            export_run(runs("llama"), tmp_path / "out", fmt="gguf", quant=quant, show_progress=False)
        assert '".[llamacpp]"' in err.value.hint
    assert not (tmp_path / "out").exists()


def test_failed_gguf_export_leaves_no_target(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encode = gguf_file.encode_tensor
    calls = {"n": 0}

    def failing(name, t, spec):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return encode(name, t, spec)

    monkeypatch.setattr(gguf_file, "encode_tensor", failing)
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(runs("llama"), target, fmt="gguf", verify=False, show_progress=False)
    assert not target.exists() and not list(tmp_path.glob(".out.*"))


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path: Path) -> None:
    """Llama 3.1 RoPE scaling becomes llama.cpp's rope_freqs tensor: per-frequency divisors from transformers."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    run = make_run(tmp_path / "r", "llama", model_overrides={"rope_parameters": rope}, n_heldout=2)
    _, path = _export_gguf(run, tmp_path / "out", "f16")
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    config = AutoConfig.from_pretrained(read_run(run).source_dir)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert np.allclose(stored, (plain / scaled).numpy(), rtol=1e-6) and stored.max() == pytest.approx(8.0)
