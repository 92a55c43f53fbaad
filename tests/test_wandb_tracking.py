"""`--wandb` end to end in offline mode: what the run's `.wandb` file and `files/` hold."""

import json
import shutil
import struct
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from benchmarks.run import main
from benchmarks.tracking import RUN_ID_FILE

from helpers.runs import micro_args

# The transaction log of wandb-core, as leveldb's log format: a 7-byte file header, then
# 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type); a protobuf
# `Record` is one FULL chunk or a FIRST, MIDDLE..., LAST sequence. wandb 0.31 ships no
# Python reader for it.
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32768
FULL, LAST = 1, 4


def wandb_records(path: Path) -> list:
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert FILE_HEADER.unpack_from(data)[0] == b":W&B"
    records, chunks, position = [], [], FILE_HEADER.size
    while position + CHUNK_HEADER.size <= len(data):
        if BLOCK_SIZE - position % BLOCK_SIZE < CHUNK_HEADER.size:  # a block's padding
            position += BLOCK_SIZE - position % BLOCK_SIZE
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, position)
        position += CHUNK_HEADER.size
        chunks.append(data[position:position + length])
        position += length
        if kind in (FULL, LAST):
            records.append(Record.FromString(b"".join(chunks)))
            chunks = []
    return records


def items(record_items) -> dict:
    """History, config or summary items as {key: value}; wandb-core writes a key either
    plain or split into `nested_key`."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record_items}


def offline_runs(out: Path) -> list[Path]:
    return sorted(out.glob("wandb/offline-run-*"))


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """The config and the history rows of one offline run."""
    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    config = items(next(r.run.config.update for r in records if r.WhichOneof("record_type") == "run"))
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    return config, history


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """Offline, silent, every wandb folder in a temporary one: nothing reaches wandb.ai."""
    import wandb

    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for name in ["DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR"]:
            patch.setenv(f"WANDB_{name}", str(home / name.lower()))
        yield
        wandb.teardown()


@pytest.fixture(scope="module")
def wandb_run(wandb_env, tiny_pipeline_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wandb-bench") / "run"
    assert main(micro_args(tiny_pipeline_dir, out) + ["--algos", "ddpo", "--wandb"]) == 0
    return out


def test_config_is_the_runs_config_json(wandb_run):
    [run_dir] = offline_runs(wandb_run)
    config, _ = read_run(run_dir)
    saved = json.loads((wandb_run / "config.json").read_text())
    for key in ["algos", "seeds", "reward", "eval_steps", "epochs", "algorithm_configs"]:
        assert config[key] == saved[key], key
    assert config["algos"] == ["ddpo"] and config["reward"] == "jpeg_compressibility"


def test_history_holds_every_epoch_and_every_evaluation(wandb_run):
    _, history = read_run(offline_runs(wandb_run)[0])
    for row in _rows(wandb_run / "metrics.jsonl"):
        prefix = f"train/{row['algo']}/seed{row['seed']}"
        metrics = {f"{prefix}/{k}": v for k, v in row.items() if isinstance(v, float)}
        assert metrics and any(h.get("epoch") == row["epoch"] and metrics.items() <= h.items() for h in history), row
    records = _rows(wandb_run / "records.jsonl")
    assert {r["eval_steps"] for r in records} == {1, 2}
    for r in records:
        name = f"{r['reward']}/{r['algo']}/seed{r['seed']}/steps{r['eval_steps']}"
        logged = [h for h in history if f"eval/{name}" in h and h["samples_seen"] == r["samples_seen"]]
        assert len(logged) == 1, r
        assert logged[0][f"eval/{name}"] == pytest.approx(r["mean"])
        assert logged[0][f"eval_std/{name}"] == pytest.approx(r["std"])


def test_sample_grid_and_table_are_in_the_runs_files(wandb_run):
    [run_dir] = offline_runs(wandb_run)
    _, history = read_run(run_dir)
    [report] = [h for h in history if "report/samples/path" in h]
    image = run_dir / "files" / report["report/samples/path"]
    assert image.parent.is_relative_to(run_dir / "files" / "media" / "images") and image.is_file()
    assert Image.open(image).size == Image.open(wandb_run / "samples.png").size
    assert (run_dir / "files" / report["report/curves/path"]).is_file()
    table = json.loads((run_dir / "files" / report["report/table/path"]).read_text())
    expected = pd.read_csv(wandb_run / "table.csv")
    assert table["columns"] == list(expected.columns)
    assert [row[0] for row in table["data"]] == expected["algorithm"].tolist() == ["base", "ddpo"]


def test_resume_continues_the_same_wandb_run(wandb_run, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(wandb_run, out)
    run_id = (out / RUN_ID_FILE).read_text().strip()
    assert offline_runs(out)[0].name.endswith(f"-{run_id}")
    assert main(micro_args(tiny_pipeline_dir, out) + ["--algos", "ddpo", "--wandb", "--resume"]) == 0
    first, resumed = offline_runs(out)
    assert resumed.name.endswith(f"-{run_id}")
    # Every epoch was checkpointed: nothing but the report is logged again.
    _, history = read_run(resumed)
    assert not any(key.startswith(("train/", "eval/")) for row in history for key in row)


def test_wandb_missing_is_refused_before_anything_loads(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    import zoo.loading

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was resolved before --wandb was checked")

    monkeypatch.setattr(zoo.loading, "resolve_model", no_model)
    out = tmp_path / "run"
    assert main(micro_args(tiny_pipeline_dir, out) + ["--wandb"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --wandb:") and "pip install wandb" in line
    assert not out.exists()
