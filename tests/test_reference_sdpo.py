"""`python -m benchmarks.reference_sdpo`: the SDPO reference's seconds per epoch from its
phase timings, its inputs refused before anything runs, and the launcher's in-memory
patches. The end-to-end run needs the reference's files and wheels, which the repository
does not hold (`.ref/`, `.refwhl/`: see the module docstring); it is slow and skipped
without them."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import reference_sdpo, reference_sdpo_launch
from benchmarks.portable import REPO_ROOT
from benchmarks.reference_sdpo import (
    PACKAGES,
    ReferenceArgs,
    check_inputs,
    epoch_figures,
    git_blob_id,
    side_by_side,
)
from rewards.jpeg import JpegSize


def _events(*spans: tuple[str, float, float]) -> list[dict]:
    events = []
    for phase, start, end in spans:
        events.append({"phase": phase, "event": "start", "time": start})
        if end is not None:
            events.append({"phase": phase, "event": "end", "time": end})
    return sorted(events, key=lambda e: e["time"])


def test_epoch_figures_on_worked_timings():
    """main starts at 0; epoch 0 samples 10-20 and waits for its rewards until 22, trains
    23-83; epoch 1 samples from 85 (rewards by 97), trains 98-158; main ends at 160. With
    one sampling batch of the paper's four, the paper's epoch is 4 times each figure:
    epoch 0: sampling 12 s (48), training 60 s (240), epoch 75 s (300: to epoch 1's start);
    epoch 1: 12, 60 and 75 s (to main's end)."""
    events = _events(("main", 0, 160), ("Epoch 0: sampling", 10, 20), ("Waiting for rewards", 20, 22),
                     ("Epoch 0.0: training", 23, 83), ("Epoch 1: sampling", 85, 95), ("Waiting for rewards", 95, 97),
                     ("Epoch 1.0: training", 98, 158))
    figures = epoch_figures(events, batches_per_epoch=1)
    assert figures["start_s"] == 10
    first, second = figures["epochs"]
    assert (first["sampling_s"], first["training_s"], first["epoch_s"]) == (12, 60, 75)
    assert (first["paper_sampling_s"], first["paper_training_s"], first["paper_epoch_s"]) == (48, 240, 300)
    assert (second["sampling_s"], second["training_s"], second["epoch_s"]) == (12, 60, 75)
    # At the paper's four batches nothing is scaled.
    assert epoch_figures(events, batches_per_epoch=4)["epochs"][0]["paper_epoch_s"] == 75
    # Stopped by a time limit while epoch 1 trained: only epoch 0 finished.
    stopped = [e for e in events if not (e["phase"] in ("Epoch 1.0: training", "main") and e["event"] == "end")]
    assert [e["epoch"] for e in epoch_figures(stopped, batches_per_epoch=1)["epochs"]] == [0]


def test_side_by_side_on_worked_numbers():
    """stepzoo's SDPO: projected 138 s, measured 150 s (16 trajectories scaled to 64);
    the reference's epochs: 300 s then 276 s per paper epoch: the last one counts,
    276 / 150 = 1.84x; 100 epochs: 138 s -> 3.83 h, 150 s -> 4.17 h, 276 s -> 7.67 h."""
    perf = {"measured_trajectories": 16, "rows": [
        {"algo": "ddpo", "epoch_s": 500.0},
        {"algo": "sdpo", "epoch_s": 138.0, "epoch_sample_calls": 8, "epoch_loss_calls": 800, "measured_epoch_s": 150.0},
    ]}
    reference = {"args": {"steps": 50, "batches_per_epoch": 1},
                 "epochs": [{"epoch": 0, "paper_epoch_s": 300.0}, {"epoch": 1, "paper_epoch_s": 276.0}]}
    table = side_by_side(perf, reference)
    assert "| stepzoo (projected) | 138 | 3.83 |" in table
    assert "| stepzoo (measured) | 150 | 4.17 |" in table
    assert "| reference (measured) | 276 | 7.67 | its epoch 1 of 1 sampling batch(es), scaled |" in table
    assert "The reference takes 1.84x stepzoo's time per epoch." in table
    assert "no epoch finished" in side_by_side(perf, {**reference, "epochs": []})


def test_git_blob_ids_are_gits(tmp_path):
    """The ids `git hash-object` gives: how a copy is checked against the commit without git."""
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "hello").write_bytes(b"hello\n")
    assert git_blob_id(tmp_path / "empty") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_id(tmp_path / "hello") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_launcher_records_the_epoch_loops_only(tmp_path):
    """The script's tqdm, wrapped: the epoch, reward-wait and training loops are recorded
    (start and end, in order), the per-batch and per-step bars are not, and every loop
    still yields what it wraps."""
    timings = reference_sdpo_launch.Timings(str(tmp_path / "t.jsonl"))
    tqdm = reference_sdpo_launch.timed_progress(lambda iterable, desc="", **kwargs: iter(iterable), timings)
    assert list(tqdm(range(3), desc="Epoch 0: sampling", position=0)) == [0, 1, 2]
    assert list(tqdm([4, 5], desc="Batch")) == [4, 5]
    assert list(tqdm(range(1), desc="Waiting for rewards")) == [0]
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [(e["phase"], e["event"]) for e in lines] == [
        ("Epoch 0: sampling", "start"), ("Epoch 0: sampling", "end"),
        ("Waiting for rewards", "start"), ("Waiting for rewards", "end"),
    ]


def test_launcher_jpeg_reward_has_the_references_interface():
    """`reward_fn(dtype, device)` -> `_fn(images, prompts, metadata) -> (scores, info)`, as
    sdpo_pytorch/rewards.py defines its rewards, scoring what stepzoo's JPEG reward scores."""
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ("a cat", "a dog", "a cat")  # the reference passes `prompts * 2`, a tuple
    scores, info = reference_sdpo_launch.jpeg_reward_factory()(torch.float16, "cpu")(images, prompts, ())
    assert info == {}
    torch.testing.assert_close(scores, JpegSize("jpeg_compressibility", -1.0).score(images, list(prompts)))
    assert (scores < 0).all()


def test_launcher_builds_the_accelerator_without_a_tracker():
    built = {}
    reference_sdpo_launch.without_tracker(lambda *args, **kwargs: built.update(kwargs))(
        log_with="wandb", mixed_precision="fp16", gradient_accumulation_steps=8
    )
    assert built == {"mixed_precision": "fp16", "gradient_accumulation_steps": 8}


def _fake_reference(folder: Path, monkeypatch) -> Path:
    """Files at the reference's paths, registered as the commit's (their own blob ids)."""
    blobs = {}
    for name in reference_sdpo.REFERENCE_FILES:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {name}\n")
        blobs[name] = git_blob_id(path)
    monkeypatch.setattr(reference_sdpo, "REFERENCE_FILES", blobs)
    return folder


def test_inputs_are_refused_first(tmp_path, monkeypatch):
    work = str(tmp_path / "work")
    with pytest.raises(SystemExit, match="--reference .*no scripts/train_sdpo.py"):
        check_inputs(ReferenceArgs(reference=str(tmp_path / "absent"), work=work))
    reference = _fake_reference(tmp_path / "sdpo", monkeypatch)
    (reference / "scripts" / "train_sdpo.py").write_text("# edited\n")
    with pytest.raises(SystemExit, match="--reference .*scripts/train_sdpo.py differ"):
        check_inputs(ReferenceArgs(reference=str(reference), work=work))
    reference = _fake_reference(tmp_path / "sdpo2", monkeypatch)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with pytest.raises(SystemExit, match="--wheels .*no wheel of diffusers==0.17.1"):
        check_inputs(ReferenceArgs(reference=str(reference), wheels=str(wheels), work=work))
    for spec in PACKAGES:
        name, version = spec.split("==")
        (wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(SystemExit, match="--work .*inside the repository"):
        check_inputs(ReferenceArgs(reference=str(reference), wheels=str(wheels), work=str(REPO_ROOT / "scratch")))
    with pytest.raises(SystemExit, match="--batches-per-epoch"):
        check_inputs(ReferenceArgs(reference=str(reference), wheels=str(wheels), work=work, batches_per_epoch=0))
    assert check_inputs(ReferenceArgs(reference=str(reference), wheels=str(wheels), work=work))[0] == reference


def test_accumulation_keeps_the_references_divisibility():
    """The reference asserts 8 prompts x batches % (2 pairs x accumulation) == 0."""
    for batches, accumulation in ((1, 4), (2, 8), (4, 8)):
        assert ReferenceArgs(batches_per_epoch=batches).accumulation == accumulation
        assert (8 * batches) % (2 * accumulation) == 0


CARRIED = REPO_ROOT / ".ref" / "sdpo", REPO_ROOT / ".refwhl"


@pytest.mark.slow
@pytest.mark.skipif(not all(p.is_dir() for p in CARRIED), reason="needs .ref/sdpo and .refwhl (module docstring)")
def test_reference_trains_end_to_end_on_a_reduced_model(tmp_path):
    record = reference_sdpo.main(ReferenceArgs(
        work=str(tmp_path / "work"), epochs=2, batches_per_epoch=1, steps=2, resolution=64, reduced=True,
        mixed_precision="no", device="cpu", out=str(tmp_path / "out"),
    ))
    assert [e["epoch"] for e in record["epochs"]] == [0, 1]
    assert record["command"].startswith("python -m benchmarks.reference_sdpo --work ")
    assert all(e["paper_epoch_s"] == pytest.approx(4 * e["epoch_s"]) for e in record["epochs"])
    assert (tmp_path / "out" / "reference-sdpo-reduced-cpu.md").is_file()
