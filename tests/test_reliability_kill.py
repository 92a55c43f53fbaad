"""SIGKILL a real benchmark process at several moments, resume it each time, and end with
the same records, metrics and LoRA weights as a run that was never interrupted.

The kills: one from outside, as soon as DDPO's first checkpoint appears (so the process
dies while sampling or training DDPO's second epoch); then, through the $STEPZOO_KILL_AT
hook (benchmarks.checkpoint.kill_point), halfway through writing DDPO's second
checkpoint, at the start of SDPO's first training pass, and at the start of SDPO's
second evaluation. The hook is a real SIGKILL at an exact place, which polling from
outside cannot reach (a checkpoint write takes microseconds).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from benchmarks.checkpoint import KILL_AT_ENV, CorruptCheckpoint, load_state

REPO = Path(__file__).resolve().parent.parent
ALGOS = ["ddpo", "sdpo"]
RUN_TIMEOUT = 400


def kill_args(model: str, out: Path) -> list[str]:
    """DDPO (per-prompt tracker) and SDPO (dense x̂0 rewards, reference log-probs) on the
    micro run: two epochs each, evaluated after every epoch at 1 and 2 steps."""
    from helpers.runs import micro_args

    return micro_args(model, out) + ["--algos", ",".join(ALGOS)]


def _env(kill_at: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPZOO_")}
    # The same thread count in every process, so that float sums are bit-identical.
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if kill_at is not None:
        env[KILL_AT_ENV] = kill_at
    return env


def _launch(args: list[str], log: Path, kill_at: str | None = None) -> subprocess.Popen:
    with open(log, "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.run", *args],
            cwd=log.parent, env=_env(kill_at), stdout=subprocess.DEVNULL, stderr=stderr,
        )


def _run(args: list[str], log: Path, kill_at: str | None = None) -> int:
    return _launch(args, log, kill_at).wait(timeout=RUN_TIMEOUT)


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]


def _epoch(out: Path, algo: str) -> int | None:
    state = load_state(out / "checkpoints" / f"{algo}_seed0.pt")
    return None if state is None else state["epoch"]


@pytest.mark.slow
def test_sigkill_at_several_moments_then_resume_equals_an_uninterrupted_run(tiny_pipeline_dir, tmp_path):
    log = tmp_path / "stderr.log"
    reference = tmp_path / "reference"
    assert _run(kill_args(tiny_pipeline_dir, reference), log) == 0, log.read_text()[-3000:]

    out = tmp_path / "run"
    args = kill_args(tiny_pipeline_dir, out)
    resume = args + ["--resume"]
    checkpoints = out / "checkpoints"

    # 1. From outside, the moment DDPO's first epoch is checkpointed: its second epoch dies.
    process = _launch(args, log)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (checkpoints / "ddpo_seed0.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert _epoch(out, "ddpo") == 1

    # 2. Halfway through writing DDPO's second checkpoint: the first one stays in place.
    assert _run(resume, log, kill_at="write:ddpo_seed0.pt") == -signal.SIGKILL
    assert _epoch(out, "ddpo") == 1
    [partial] = checkpoints.glob(".ddpo_seed0.pt.*.tmp")
    with pytest.raises(CorruptCheckpoint):
        load_state(partial)

    # 3. During SDPO's first epoch, after sampling, as training starts.
    assert _run(resume, log, kill_at="train:sdpo:1") == -signal.SIGKILL
    assert _epoch(out, "ddpo") == 2 and _epoch(out, "sdpo") is None
    assert not list(checkpoints.glob("*.tmp"))  # the next write of the file removed it

    # 4. During SDPO's second evaluation.
    assert _run(resume, log, kill_at="evaluate:sdpo:2") == -signal.SIGKILL
    assert _epoch(out, "sdpo") == 1

    assert _run(resume, log) == 0, log.read_text()[-3000:]
    assert _records(out) == _records(reference)
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    for algo in ALGOS:
        name = f"lora/{algo}_seed0/pytorch_lora_weights.safetensors"
        resumed, straight = load_file(out / name), load_file(reference / name)
        assert resumed.keys() == straight.keys()
        assert all((resumed[k] == straight[k]).all() for k in resumed), algo
