"""train.startup_checks: the check's input is a short slice of the first micro-batch, laid out as in training."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qlora_kit.ops.selfcheck import NOT_APPLICABLE, PASSED, SWITCHED_OFF, Outcome
from qlora_kit.train import startup_checks as S


def _sample(n: int, prompt: int, start: int = 10) -> dict[str, list[int]]:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


def test_packed_slice_takes_the_ends_of_the_samples_in_turn() -> None:
    samples = [_sample(300, 250), _sample(40, 20, 1000), _sample(500, 100, 2000)]
    batch = S.check_batch(samples, [[0, 1], [2]], pad_id=0, packed=True, tokens=256)
    lengths = batch["packed_seq_lens"]
    assert sum(lengths) == batch["input_ids"].shape[1] <= 256
    assert lengths == (128, 40, 88)  # the last 128 of the first, all of the second, the rest from the third
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids[:128] == samples[0]["input_ids"][-128:]  # the answer end of the first sample
    assert ids[168:] == samples[2]["input_ids"][-88:]
    starts = [0, 128, 168]
    assert all(labels[s] == -100 for s in starts)  # no sample predicts the next one's first token
    positions = batch["position_ids"][0].tolist()
    assert [positions[s] for s in starts] == [0, 0, 0] and positions[127] == 127
    assert sum(label != -100 for label in labels) > 100  # the answers are in the slice


def test_one_long_sample_becomes_two_pieces() -> None:
    batch = S.check_batch([_sample(2048, 1000)], [[0]], pad_id=0, packed=True, tokens=256)
    assert batch["packed_seq_lens"] == (128, 128)
    assert batch["input_ids"][0].tolist() == list(range(10 + 2048 - 128, 10 + 2048)) + \
        list(range(10 + 2048 - 256, 10 + 2048 - 128))


def test_unpacked_slice_is_right_padded_rows() -> None:
    batch = S.check_batch([_sample(30, 10), _sample(200, 50, 500)], [[0], [1]], pad_id=0, packed=False)
    assert batch["input_ids"].shape == (3, 128) and "cu_seq_lens_q" not in batch  # 30, the last 128, then 72
    assert batch["attention_mask"][0].sum() == 30 and batch["attention_mask"][1].sum() == 128
    assert (batch["labels"][0, 30:] == -100).all()


def test_a_slice_without_labels_trains_on_every_token() -> None:
    batch = S.check_batch([_sample(400, 400)], [[0]], pad_id=0, packed=True, tokens=256)
    labels = batch["labels"][0]
    assert (labels == -100).sum() == 2 and labels[1] == batch["input_ids"][0, 1]


def test_every_rank_switches_off_what_any_rank_switched_off() -> None:
    class TwoRanks:
        def __init__(self, other: set[str]):
            self.other = other
            self.calls = 0

        def any(self, flag: bool) -> bool:  # what the all-reduce returns: this rank's flag or the other's
            name = S.PATH_NAMES[self.calls]
            self.calls += 1
            return flag or name in self.other

    mine = [Outcome("packed_attention", PASSED, "eager", 1e-7, 1e-6), Outcome("fused_loss", PASSED, "full", 0, 0),
            Outcome("tiled_mlp", SWITCHED_OFF, "plain", 1.0, 1.0), Outcome("activation_offload", NOT_APPLICABLE),
            Outcome("checkpoint_layout", PASSED, "all", 0, 0)]
    dist = TwoRanks({"fused_loss"})
    agreed = {o.name: o for o in S._agree(mine, dist)}
    assert dist.calls == len(S.PATH_NAMES)  # one all-reduce per path, the same on every rank
    assert agreed["fused_loss"].status == SWITCHED_OFF and "another process" in agreed["fused_loss"].reason
    assert agreed["tiled_mlp"].status == SWITCHED_OFF and agreed["packed_attention"].status == PASSED


def test_switching_off_records_the_library_path_in_the_config() -> None:
    from qlora_kit.core.config import Config

    cfg = Config.model_validate({"model": {"name_or_path": "m"}, "data": {"path": "d"}, "output_dir": "o",
                                 "train": {"fused_loss": True, "tiled_mlp": False, "checkpoint_every_n_layers": 2}})
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=64, num_attention_heads=4),
                            set_attn_implementation=lambda name: setattr(model.config, "_attn_implementation", name))
    cpu = SimpleNamespace(device=torch.device("cpu"), compute_dtype=torch.float32)
    out = S.switch_off(cfg, model, ["fused_loss", "packed_attention"], cpu)
    assert out.train.fused_loss is False and out.model.attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"
    assert cfg.train.fused_loss is True  # the caller's config is left alone
