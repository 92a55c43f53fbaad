"""Learning, end to end on the tiny world: every algorithm raises held-out reward at the
step count it trains at.

Each algorithm trains from the shipped tiny model on the tiny preset's budget (10 epochs
of 64 trajectories at K=4, seed 0) through the real runner, with DDPO's classic
JPEG-compressibility reward, under the protocol its learning rates were tuned and these
runs measured in (one group per prompt, the published stat-tracker min_count 16; the
preset now samples 4 groups per prompt for its proxy/gold tasks); then its held-out reward at K=4
must beat the base model's by more than the base's own seed-to-seed spread there: the
range of the base's 4-step reward over several evaluation seeds (different noise, same
prompts). A run that changes nothing, or only reshuffles noise, cannot pass.

The algorithms' settings are the tiny preset's (8 updates per epoch each, the learning
rates `benchmarks.tune` selected), except REBEL's: at its selected 1e-2, the edge of its
stability (the grid's next value collapses), seed 0 rises at K=4 by epoch 5 and falls back
to the base by epoch 10 (−1.204 against −1.200 here; measured), so the test shows that
REBEL learns at the grid's next-lower rate, 3e-3. Whether a gain carries to other step counts is what
the benchmark measures, not what this test asserts: at the selected rates REBEL ends below
the base at 1 step on seed 0, and DDPO's mean over step counts dips below the base after 6
epochs before it recovers (README, results). The preset's watched golds are scored too but not asserted on (every algorithm hacks this
reward). JPEG sizes have no gradient, so reward back-propagation (DRaFT) learns on the
tiny aesthetic proxy instead (tests/test_algo_draft.py), and GRPO, not tuned on JPEG, learns on
the flow student's default task, the model family it was made for. DDPO also runs once more with
`--finetune full`: every weight of the UNet trained, at its own learning rate.
"""

import json

import pytest
import torch
from accelerate import Accelerator

from benchmarks.cli import parse_args
from benchmarks.evaluate import EvalSettings, evaluate
from benchmarks.plan import make_plan
from benchmarks.presets import tiny
from benchmarks.run import main
from rewards.registry import load_reward
from zoo.loading import load_policy
from zoo.algorithm import RewardBackpropAlgorithm
from zoo.registry import ALGORITHMS

REWARD = "jpeg_compressibility"
EVAL_SAMPLES_PER_PROMPT = 8  # x 4 test prompts
EPOCHS = 10
TRAIN_STEPS = 4
EVAL_STEPS = (TRAIN_STEPS,)
"""Only the step count asserted on: each step count's evaluation noise has its own seed
(`benchmarks.evaluate.evaluation_seed`), so its numbers are those of an evaluation of 1, 2, 4
and 8 steps, at 4 of their 15 denoiser calls an image."""
STABLE_OVERRIDES = {"rebel": ["--rebel.learning-rate", "3e-3"]}
JPEG_PROTOCOL = [
    "--groups-per-prompt", "1",
    *(flag for algo in ("ddpo", "rebel", "sdpo") for flag in (f"--{algo}.tracker-min-count", "16")),
]
BASE_SEEDS = range(5)
pytestmark = pytest.mark.slow


def _eval_settings(seed: int) -> EvalSettings:
    preset = tiny()
    return EvalSettings(
        prompts=preset.eval_prompts,
        step_counts=EVAL_STEPS,
        samples_per_prompt=EVAL_SAMPLES_PER_PROMPT,
        batch_size=preset.eval_batch_size,
        sampler=preset.sampler,
        guidance_scale=preset.guidance_scale,
        eta=preset.eta,
        seed=seed,
        timestep_spacing=preset.timestep_spacing,
    )


@pytest.fixture(scope="module")
def base_spread() -> tuple[float, float]:
    """(4-step reward at evaluation seed 0, its max - min over evaluation seeds) of the base."""
    accelerator = Accelerator(cpu=True)
    policy = load_policy(tiny().model)
    reward = load_reward(REWARD)
    means = []
    for seed in BASE_SEEDS:
        stats, _ = evaluate(policy, {REWARD: reward}, _eval_settings(seed), accelerator)
        means.append(stats[(TRAIN_STEPS, REWARD)]["mean"])
    return means[0], max(means) - min(means)


NOT_ON_JPEG = {
    "grpo": "GRPO is not tuned on JPEG: at its 2e-3 the 4-step reward stays at the base's (-1.2002 against "
            "-1.1996, measured) and at DDPO's selected 3e-2 it collapses (-1.60); it learns on the flow "
            "student's default task instead (test_grpo_raises_held_out_reward_on_the_flow_student)",
}
"""Algorithms whose learning on JPEG is not shown, with what was measured, and where it is."""
FULL_FINETUNE = ["--finetune", "full", "--ddpo.learning-rate", "1e-3"]
"""Every weight of the UNet trained by DDPO: at 1e-3 its 4-step reward rises from the base's
-1.200 to -1.019 after 5 epochs and -0.860 after 10; at 3e-4, to -0.986 and back to -1.075
(measured, seed 0)."""
JPEG_RUNS = [
    *(pytest.param(n, [], id=n) for n, config in ALGORITHMS.items()
      if n not in NOT_ON_JPEG and not isinstance(config().build(), RewardBackpropAlgorithm)),
    pytest.param("ddpo", FULL_FINETUNE, id="ddpo-full-finetune"),
]
"""(algorithm, extra flags) of each learning run: every log-prob algorithm with its LoRA, and
DDPO training every weight."""


@pytest.mark.parametrize("algo, extra", JPEG_RUNS)
def test_training_raises_held_out_reward(algo, extra, base_spread, tmp_path):
    out = tmp_path / "run"
    args = [
        # The tiny preset's model and settings, which `base_spread` evaluates (the runner's
        # default preset is tiny-turbo's few-step model).
        "--preset", "tiny",
        "--algos", algo,
        "--reward", REWARD,
        "--train-steps", str(TRAIN_STEPS),
        "--trajectories-per-epoch", "64",
        "--epochs", str(EPOCHS),
        "--eval-every", str(EPOCHS),
        "--eval-samples-per-prompt", str(EVAL_SAMPLES_PER_PROMPT),
        "--eval-steps", ",".join(map(str, EVAL_STEPS)),
        "--out", str(out),
        *JPEG_PROTOCOL,
        *STABLE_OVERRIDES.get(algo, []),
        *extra,
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    records = [r for r in records if r["reward"] == REWARD]
    final = {r["eval_steps"]: r["mean"] for r in records if r["algo"] == algo and r["epoch"] == EPOCHS}
    base = {r["eval_steps"]: r["mean"] for r in records if r["algo"] == "base"}
    trained_mean, base_mean = final[TRAIN_STEPS], base[TRAIN_STEPS]
    seed0_mean, spread = base_spread
    assert base_mean == pytest.approx(seed0_mean, abs=1e-6)  # the runner's base is the same evaluation
    print(f"{algo}: base {base} -> {final} (base spread at {TRAIN_STEPS} steps over seeds {spread:.4f})")
    assert trained_mean - base_mean > spread, (algo, base_mean, trained_mean, spread)
    assert torch.isfinite(torch.tensor(trained_mean))


FLOW_STUDENT_EPOCHS = 20
"""GRPO's budget on the flow student: in results/tiny-flow-turbo-tiny-aesthetic-verdict seed 0's
4-step test proxy is +0.081 over the base at epoch 20 (+0.049 at 16; the mean over 20 seeds
+0.055 at 20, 90% of the seeds above the base), at the preset's tuned 2e-3."""


def test_grpo_raises_held_out_reward_on_the_flow_student(tmp_path):
    """Flow-GRPO on the model family it was made for: the tiny-flow-turbo preset's default task
    (the tiny aesthetic proxy), its tuned rate, seed 0; the held-out proxy at the training K
    must beat the base's by more than the base's own spread over evaluation seeds."""
    out = tmp_path / "run"
    flags = ["--preset", "tiny-flow-turbo", "--eval-steps", str(TRAIN_STEPS), "--eval-split", "test",
             "--eval-samples-per-prompt", str(EVAL_SAMPLES_PER_PROMPT)]
    plan = make_plan(parse_args([*flags, "--out", str(out)]))
    accelerator = Accelerator(cpu=True)
    policy = load_policy(plan.model)
    reward = load_reward(plan.reward)
    means = [evaluate(policy, {plan.reward: reward}, plan.eval_settings(seed), accelerator)[0]
             [(TRAIN_STEPS, plan.reward)]["mean"] for seed in BASE_SEEDS]
    spread = max(means) - min(means)
    assert main([*flags, "--algos", "grpo", "--seeds", "0", "--epochs", str(FLOW_STUDENT_EPOCHS),
                 "--eval-every", str(FLOW_STUDENT_EPOCHS), "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    scores = {(r["algo"], r["epoch"]): r["mean"] for r in records if r["reward"] == plan.reward}
    base, trained = scores[("base", 0)], scores[("grpo", FLOW_STUDENT_EPOCHS)]
    assert base == pytest.approx(means[0], abs=1e-6)  # the runner's base is the same evaluation
    print(f"grpo on the flow student: base {base:.4f} -> {trained:.4f} (base spread {spread:.4f})")
    assert trained - base > spread, (base, trained, spread)
