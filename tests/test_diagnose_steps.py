"""The per-step diagnosis: its statistics on worked numbers, the identity it rests on (x̂0 at
t = 999 is the 1-step sample) and its errors."""

import json
import math

import pytest
import torch

from benchmarks.diagnose_steps import main, step_statistics
from zoo.loading import load_policy
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

from helpers.rewards import Brightness


def test_step_statistics_on_worked_numbers():
    # 3 pairs, K = 2: columns are x̂0_0, x̂0_1, final.
    scores = torch.tensor([
        [[0.5, 0.2, 0.3], [0.5, 0.4, 0.1]],   # step 0 tied; step 1 diff -0.2, final diff +0.2
        [[0.1, 0.6, 0.7], [0.3, 0.1, 0.2]],   # step 0 diff -0.2, final +0.5; step 1 +0.5
        [[0.2, 0.1, 0.0], [0.4, 0.3, 0.4]],   # step 0 -0.2, final -0.4; step 1 -0.2
    ])
    gold_final = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # gold diffs -1, +1, +1
    step0, step1 = step_statistics(scores, gold_final, [999, 499])
    assert (step0.timestep, step1.timestep) == (999, 499)
    # Step 0: pair 1 tied; of the others, pair 2 disagrees (-, +), pair 3 agrees (-, -).
    assert step0.pair_ties == pytest.approx(1 / 3)
    assert step0.pair_sign_agreement == pytest.approx(0.5)
    # Against the gold (+ for pairs 2 and 3): both disagree.
    assert step0.pair_sign_agreement_with_gold == pytest.approx(0.0)
    # Step 1: diffs -0.2, +0.5, -0.2 vs final +0.2, +0.5, -0.4 -> 2 of 3; vs gold -1, +1, +1 -> 2 of 3.
    assert step1.pair_sign_agreement == pytest.approx(2 / 3)
    assert step1.pair_sign_agreement_with_gold == pytest.approx(2 / 3)
    assert step1.pair_ties == 0.0
    values = torch.tensor([0.5, 0.5, 0.1, 0.3, 0.2, 0.4])
    assert step0.mean == pytest.approx(float(values.mean()))
    assert step0.stderr == pytest.approx(float(values.std()) / math.sqrt(6))
    assert step0.gold_pair_ties == 0.0
    final = scores[..., -1].flatten()
    expected = torch.corrcoef(torch.stack([values, final]))[0, 1]
    assert step0.corr_with_final == pytest.approx(float(expected), abs=1e-6)


def test_pairs_the_gold_ties_are_left_out_of_the_gold_agreement():
    """A gold that counts attributes ties within most pairs; such a pair has no sign to agree
    with. Pair 1 ties on the gold; pair 2's step difference (+) agrees with its gold (+)."""
    scores = torch.tensor([[[0.1, 0.3], [0.2, 0.1]], [[0.4, 0.5], [0.1, 0.2]]])  # K = 1
    gold_final = torch.tensor([[1.0, 1.0], [1.0, 2 / 3]])
    (step,) = step_statistics(scores, gold_final, [999])
    assert step.gold_pair_ties == pytest.approx(0.5)
    assert step.pair_sign_agreement_with_gold == pytest.approx(1.0)
    assert step.pair_sign_agreement == pytest.approx(0.5)  # pair 1: step -0.1, final +0.2


def test_x0_prediction_at_the_top_step_is_the_one_step_sample(tiny_pipeline_dir):
    """The diagnosis reads x̂0_0 of a K-step trajectory as the 1-step sample: with trailing
    spacing both predict x̂0 at t = 999 from the same x_T, and the 1-step sampler's only
    step lands on that x̂0, up to the residual noise level of alphas_cumprod[0]."""
    policy = load_policy(tiny_pipeline_dir)
    prompts = ["a red circle on a white background", "a blue square on a black background"]
    four = TrajectorySampler(policy, SamplerConfig("ddim", 4, 1.0, 4.0, "trailing"))
    one = TrajectorySampler(policy, SamplerConfig("ddim", 1, 1.0, 4.0, "trailing"))
    x_t = four.initial_noise(2, 1, False, torch.Generator().manual_seed(3))
    traj = four.sample(prompts, initial_noise=x_t, generator=torch.Generator().manual_seed(4), record_pred_x0=True)
    single = one.sample(prompts, initial_noise=x_t, generator=torch.Generator().manual_seed(5), record_pred_x0=True)
    assert int(traj.timesteps[0, 0, 0]) == int(single.timesteps[0, 0, 0]) == 999
    torch.testing.assert_close(traj.pred_x0[:, 0, 0], single.pred_x0[:, 0, 0])
    x0_image = policy.decode(traj.pred_x0[:, 0, 0])
    gap = (x0_image - single.images[:, 0]).abs().max()
    assert gap < 5e-3, gap
    # A later step's x̂0 is a different picture: the bound above is not loose enough to pass anything.
    assert (policy.decode(traj.pred_x0[:, 0, 1]) - single.images[:, 0]).abs().max() > 10 * gap


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert main(["--run", str(tmp_path)]) == 2
    assert "--run" in capsys.readouterr().err


def test_a_reward_without_gold_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"preset": "tiny", "reward": "jpeg_compressibility"}))
    with pytest.raises(SystemExit, match="declares no gold"):
        main(["--run", str(tmp_path)])


@pytest.mark.parametrize("shared", [True, False])
def test_pairs_share_x_t_only_when_asked(tiny_pipeline_dir, shared):
    """SDPO's and D3PO's pairs share x_T, so their x̂0 at t = 999 ties; DDPO's and REBEL's
    comparisons (`--independent-noise`) do not."""
    from benchmarks.diagnose_steps import score_steps

    policy = load_policy(tiny_pipeline_dir)
    config = SamplerConfig("ddim", 2, 1.0, 1.0, "trailing")
    scores, timesteps, anchors = score_steps(policy, config, ["a red circle on a white background"], 3,
                                             {"brightness": Brightness()}, seed=0, shared_noise=shared)
    first = scores["brightness"][:, :, 0]  # (3 pairs, 2)
    assert scores["brightness"].shape == (3, 2, 3) and timesteps == [999, 499] and anchors.shape == (6,)
    assert bool(torch.equal(first[:, 0], first[:, 1])) == shared


def test_a_fully_fine_tuned_run_is_read_from_its_model_folder(tiny_flow_pipeline_dir, tmp_path):
    """A run recorded with --finetune full keeps its weights under model/, not lora/: the
    diagnosis loads them there (weights moved by 0.01 change every score) and names that
    folder when a seed is missing."""
    from benchmarks.cli import parse_args
    from benchmarks.diagnose_steps import diagnose
    from benchmarks.plan import make_plan
    from benchmarks.train import trained_weights_folder

    run = tmp_path / "run"
    run.mkdir()
    plan = make_plan(parse_args(["--preset", "tiny-flow", "--model", tiny_flow_pipeline_dir, "--algos", "ddpo",
                                 "--finetune", "full", "--out", str(run)]))
    (run / "config.json").write_text(json.dumps(plan.config_json()))
    trained = load_policy(tiny_flow_pipeline_dir, full_finetune=True)
    with torch.no_grad():
        for p in trained.named_trainable_parameters().values():
            p.add_(0.01)
    trained.save_weights(trained_weights_folder(run, "ddpo", 0, "full"), write=True)
    results = diagnose(run, 0, ["ddpo"], "test", pairs_per_prompt=1, steps=1)
    base, ddpo = (results["policies"][name]["final"] for name in ("base", "ddpo"))
    assert ddpo["tiny-aesthetic"] != base["tiny-aesthetic"]
    with pytest.raises(SystemExit, match="model/ddpo_seed1 is missing"):
        diagnose(run, 1, ["ddpo"], "test", pairs_per_prompt=1, steps=1)
