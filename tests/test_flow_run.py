"""The benchmark runner on a flow-matching model: every algorithm end to end on the micro
budget of helpers.runs.micro_args, and the family checks that refuse a model the
preset's sampler cannot sample before it loads."""

import json

import pytest

from benchmarks.run import main

from helpers.runs import ALGOS, EVAL_STEPS, micro_args


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_every_algorithm_trains_and_evaluates_on_a_flow_model(tiny_flow_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    args = micro_args(tiny_flow_pipeline_dir, out, "tiny-flow") + ["--algos", ",".join(ALGOS)]
    assert main(args) == 0
    rows = _rows(out)
    for algo in ["base", *ALGOS]:
        steps = {row["eval_steps"] for row in rows if row["algo"] == algo and row["epoch"] == (0 if algo == "base" else 2)}
        assert steps == set(EVAL_STEPS), algo
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm_configs"]["grpo"]["sampler"] == "flow" and config["algorithm_configs"]["grpo"]["eta"] == 0.7
    assert "attn.add_q_proj" in config["algorithm_configs"]["ddpo"]["lora_target_modules"]


def test_draft_backpropagates_through_the_flow_sampler(tiny_flow_pipeline_dir, tmp_path):
    out = tmp_path / "draft"
    args = micro_args(tiny_flow_pipeline_dir, out, "tiny-flow") + ["--algos", "draft", "--reward", "tiny-aesthetic"]
    assert main(args) == 0
    assert any(row["algo"] == "draft" and row["epoch"] == 2 for row in _rows(out))


@pytest.mark.parametrize("preset, model_fixture, expected", [
    ("tiny-flow", "tiny_pipeline_dir", "an ε-prediction UNet model (unet/), which the tiny-flow preset's flow sampler"),
    ("tiny", "tiny_flow_pipeline_dir", "a flow-matching model (transformer/), which the tiny preset's ddim sampler"),
])
def test_a_model_of_the_other_family_is_refused_before_loading(preset, model_fixture, expected, request, tmp_path, capsys):
    model = request.getfixturevalue(model_fixture)
    assert main(micro_args(model, tmp_path / "run", preset)) == 2
    error = capsys.readouterr().err
    assert expected in error and "pass" in error
    assert not (tmp_path / "run").exists()
