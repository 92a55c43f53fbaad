"""`python -m benchmarks.perf` runs on the tiny world and on a reduced real architecture and
writes its table. Speeds are measured by the command, never asserted here."""

import json

import pytest
import torch

from benchmarks import archs
from benchmarks.perf import COLUMNS, PerfArgs, main

FIGURES = ("sample_traj_s", "sample_speedup", "epoch_traj_s", "overlap_speedup", "train_transitions_s",
           "train_speedup", "reward_images_s", "sample_peak_gb", "train_peak_gb", "train_tflops", "mfu", "ratio_drift")
PAIR_BASELINES = ("sample_speedup", "train_speedup")
"""Timed only for groups of two: with one member the per-member way is the batched way."""


def _check_outputs(record: dict, out, setting: str, algos: list[str], figures=FIGURES) -> None:
    """Every figure present and non-negative; the same trajectories score the same with
    rewards overlapped or not."""
    table = (out / f"{setting}.md").read_text()
    assert "| " + " | ".join(header for _, header in COLUMNS) + " |" in table
    assert json.loads((out / f"{setting}.json").read_text()) == json.loads(json.dumps(record))
    assert [row["algo"] for row in record["rows"]] == algos
    for row in record["rows"]:
        assert "error" not in row
        expected = [key for key in figures if row["group"] > 1 or key not in PAIR_BASELINES]
        assert all(row[key] >= 0 for key in expected), row
        assert row["overlap_score_diff"] == 0
        assert row["ratio_drift"] <= 1e-3  # float32 on the CPU: re-scoring is exact


def test_tiny_world_table(tmp_path):
    args = PerfArgs(preset="tiny", algos="sdpo,ddpo", batch_size=2, steps=1, repeats=1, device="cpu", out=str(tmp_path))
    record = main(args)
    _check_outputs(record, tmp_path, "tiny-cpu", ["sdpo", "ddpo"])
    sdpo, ddpo = record["rows"]
    assert (sdpo["group"], sdpo["batch"], sdpo["train_batch"], sdpo["steps"]) == (2, 2, 1, 1)
    assert (ddpo["group"], ddpo["train_batch"]) == (1, 2)  # the preset's 4 is clamped to the groups sampled
    assert "sample_speedup" in sdpo and "sample_speedup" not in ddpo


def test_reduced_sd_turbo_table(tmp_path):
    args = PerfArgs(
        preset="sd-turbo", reduced=True, resolution=64, algos="sdpo", batch_size=2, steps=1, repeats=1,
        device="cpu", gradient_checkpointing=True, baseline=False, tag="ckpt", out=str(tmp_path),
    )
    record = main(args)
    without_baseline = tuple(key for key in FIGURES if key not in PAIR_BASELINES)
    _check_outputs(record, tmp_path, "sd-turbo-reduced-cpu-ckpt", ["sdpo"], without_baseline)
    assert "sample_speedup" not in record["rows"][0]
    assert record["resolution"] == 64 and record["performance"]["gradient_checkpointing"]


def test_reduced_architectures_keep_the_real_layout():
    for preset in ("sd-turbo", "sd15", "lcm"):
        real, reduced = archs.load_configs(preset), archs.load_configs(preset, reduced=True)
        for key in ("down_block_types", "up_block_types", "attention_head_dim", "in_channels", "time_cond_proj_dim"):
            assert real["unet"].get(key) == reduced["unet"].get(key)
        assert reduced["unet"]["cross_attention_dim"] == reduced["text_encoder"]["hidden_size"]
        unet, vae, text, tokenizer = archs.build_components(reduced, resolution=64)
        assert unet.config.sample_size == 8 and tokenizer.model_max_length == 77
        ids = tokenizer(["a cat"], padding="max_length", return_tensors="pt").input_ids
        context = text(ids)[0]
        with torch.no_grad():
            out = unet(torch.randn(1, 4, 8, 8), torch.tensor([999]), encoder_hidden_states=context).sample
        assert out.shape == (1, 4, 8, 8)
