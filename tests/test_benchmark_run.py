"""The benchmark runner end to end on a micro budget: outputs, resume, refusals."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

import benchmarks.train
from benchmarks.presets import tiny
from benchmarks.run import main

from helpers.runs import ALGOS, EVAL_STEPS, micro_args

EVERY_ALGO = ["--algos", ",".join(ALGOS)]
"""Every registered algorithm that trains on JPEG sizes (DRaFT needs a gradient)."""
REPO = Path(__file__).resolve().parent.parent


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in records]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "run"
    assert main(micro_args(tiny_pipeline_dir, out) + EVERY_ALGO) == 0
    return out


def test_run_writes_every_output(finished_run):
    out = finished_run
    for name in ["records.jsonl", "table.md", "table.csv", "curves.png", "samples.png", "config.json", "metrics.jsonl"]:
        assert (out / name).is_file(), name
    records = _records(out)
    # base: one evaluation; each algorithm: epochs 1 and 2; each at 2 step counts.
    assert len(records) == len(EVAL_STEPS) * (1 + 2 * len(ALGOS))
    assert {r["algo"] for r in records} == {"base", *ALGOS}
    final = [r for r in records if r["epoch"] == 2]
    test_images = len(tiny().eval_prompts)  # one sample per test prompt
    assert all(r["samples_seen"] == 16 and r["count"] == test_images for r in final)
    # One update per epoch each; a backward pass per loss call: per step (K = 2), or per
    # whole trajectory (REBEL), or per timestep of the noised final latents (NFT).
    assert all(r["optimizer_updates"] == 2 for r in final)
    backward = {r["algo"]: r["backward_passes"] for r in final}
    assert backward == {"ddpo": 4, "rebel": 2, "d3po": 4, "sdpo": 4, "grpo": 4, "nft": 4}
    calls = {r["algo"]: r["reward_calls"] for r in final}
    # SDPO scores first, anchor and last x̂0: three reward calls per trajectory.
    assert calls == {"ddpo": 16, "rebel": 16, "d3po": 16, "sdpo": 48, "grpo": 16, "nft": 16}

    table = pd.read_csv(out / "table.csv")
    assert table.iloc[:, 0].tolist() == ["base", *ALGOS]
    assert {"1 step", "2 steps", "trajectories", "updates", "backward passes", "reward calls", "train s"} <= set(table.columns)
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm_configs"]["sdpo"]["num_steps"] == 2
    for algo in ALGOS:
        assert (out / "lora" / f"{algo}_seed0" / "pytorch_lora_weights.safetensors").is_file()


class Interrupted(Exception):
    pass


def _run_until_checkpoint(argv: list[str], checkpoint: str, monkeypatch) -> None:
    """Run `main(argv)` and stop it right after `checkpoint` (e.g. rebel_seed0.pt) is written
    at epoch 1, as a kill would, its files left as they are."""
    real_save = benchmarks.train.save_state

    def save_then_stop(path, state):
        real_save(path, state)
        if Path(path).name == checkpoint and state["epoch"] == 1:
            raise Interrupted

    monkeypatch.setattr(benchmarks.train, "save_state", save_then_stop)
    with pytest.raises(Interrupted):
        main(argv)
    monkeypatch.setattr(benchmarks.train, "save_state", real_save)


def test_resume_after_interruption_gives_the_same_records(finished_run, tiny_pipeline_dir, tmp_path, monkeypatch):
    """Stop the run right after REBEL's first epoch is checkpointed, resume, and compare
    with the uninterrupted run: the same records and the same final LoRA weights."""
    out = tmp_path / "run"
    _run_until_checkpoint(micro_args(tiny_pipeline_dir, out) + EVERY_ALGO, "rebel_seed0.pt", monkeypatch)

    assert main(micro_args(tiny_pipeline_dir, out) + EVERY_ALGO) == 2  # refuses to overwrite silently
    assert main(micro_args(tiny_pipeline_dir, out) + EVERY_ALGO + ["--resume"]) == 0
    assert _comparable(_records(out)) == _comparable(_records(finished_run))
    for algo in ALGOS:
        name = f"lora/{algo}_seed0/pytorch_lora_weights.safetensors"
        resumed, straight = load_file(out / name), load_file(finished_run / name)
        assert resumed.keys() == straight.keys()
        assert all((resumed[k] == straight[k]).all() for k in resumed), algo


def test_resume_from_config_needs_no_other_flag(finished_run, tiny_pipeline_dir, tmp_path, monkeypatch):
    """Stopped after DDPO's first epoch, the run resumes from its config.json alone (its
    folder the default --out) and ends with the uninterrupted run's records."""
    out = tmp_path / "run"
    _run_until_checkpoint(micro_args(tiny_pipeline_dir, out) + EVERY_ALGO, "ddpo_seed0.pt", monkeypatch)
    assert main(["--config", str(out / "config.json"), "--resume"]) == 0
    assert _comparable(_records(out)) == _comparable(_records(finished_run))


def test_missing_reward_weights_end_fast_with_one_paragraph(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPZOO_")}
    env["HF_HOME"] = str(tmp_path / "hf")
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--algos", "sdpo,ddpo,rebel", "--reward", "pickscore"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in result.stderr  # the missing weights and the fix, then details
    assert lines[0].startswith("error: Reward 'pickscore'") and "hf download yuvalkirstain/PickScore_v1" in lines[0]
    assert "--reward-path" in lines[1]
    assert elapsed < 60
    assert not (tmp_path / "results").exists()
