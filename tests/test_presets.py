"""The presets against their papers' configs (issue 12): the timesteps every preset samples
at, training and evaluation alike, and the audited budgets and hyperparameters.

References at their latest commits: ZiyiZhang27/sdpo fcee34d, kvablack/ddpo-pytorch
1958463, Owen-Oertell/rlcm b8330ed (file:line citations beside each value in
`benchmarks/presets.py`).
"""

import json
from dataclasses import replace

import pytest
import torch

from benchmarks.cli import parse_args, preset_algo_configs
from benchmarks.plan import check_batch_sizes, epoch_budget, make_plan
from benchmarks.presets import PRESETS, SD_TURBO_REWARD_SETTINGS, SIMPLE_ANIMALS
from benchmarks.train import JobSettings, training_sampler_config
from zoo.loading import load_policy
from zoo.policy import Policy
from zoo.registry import ALGORITHMS
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler
from zoo.tiny.arch import build_random_pipeline

DDIM_PRESETS = [name for name, preset in PRESETS.items() if preset().sampler == "ddim"]
GPU_PRESETS = [name for name in PRESETS if not name.startswith("tiny")]
RLCM_EIGHT_STEPS = [999, 879, 759, 639, 519, 399, 279, 159]
"""RLCM's 8 timesteps: rlcm lcm_rl_pytorch/diffusers_patch/lcm_scheduler.py:377-382 with
original_inference_steps 50 (:205); diffusers 0.42.1 gives 999, 879, 759, 639, 499, 379, 259, 139."""


@pytest.fixture(scope="module")
def leading_pipeline_dir(tmp_path_factory) -> str:
    """A tiny random DDIM pipeline whose scheduler config says "leading" with steps_offset
    1, as Stable Diffusion 1.5's does."""
    folder = build_random_pipeline(tmp_path_factory.mktemp("leading") / "pipe", seed=0)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "timestep_spacing": "leading", "steps_offset": 1}))
    return str(folder)


def _plan(preset: str, model: str, out):
    """The plan of `preset` on a local tiny model, with a reward that needs no weights."""
    args = parse_args(["--preset", preset, "--model", model, "--reward", "jpeg_compressibility",
                       "--eval-steps", "1,2,4,8", "--out", str(out)])
    return make_plan(args)


def _job(plan, out) -> JobSettings:
    return JobSettings(model=plan.model, epochs=plan.epochs, trajectories_per_epoch=plan.trajectories_per_epoch,
                       train_prompts=plan.preset.train_prompts, eval_every=plan.eval_every,
                       eval=plan.eval_settings(0), mixed_precision="no", train_reward=plan.reward, out_dir=out)


def _timesteps(policy: Policy, config: SamplerConfig) -> list[int]:
    return TrajectorySampler(policy, config).kernel.timesteps.tolist()


@pytest.mark.parametrize("name", DDIM_PRESETS)
def test_ddim_presets_sample_from_the_top_of_the_schedule(name, leading_pipeline_dir, tmp_path):
    """Evaluation at 1 and 2 steps starts at t = 999 and training runs the trailing K = 50
    grid, though the model's scheduler config says "leading" (t = 1 at one step)."""
    policy = load_policy(leading_pipeline_dir)
    assert _timesteps(policy, SamplerConfig("ddim", 1)) == [1]  # the trap: the config's own spacing
    plan = _plan(name, leading_pipeline_dir, tmp_path / "run")
    evaluation = plan.eval_settings(seed=0)
    assert _timesteps(policy, evaluation.sampler_config(1)) == [999]
    assert _timesteps(policy, evaluation.sampler_config(2)) == [999, 499]
    job = _job(plan, tmp_path / "run")
    for algo, config in plan.configs.items():
        timesteps = _timesteps(policy, training_sampler_config(config, job))
        assert timesteps[0] == 999 and timesteps[-1] == 1000 // config.num_steps - 1, algo
    assert plan.config_json()["timestep_spacing"] == "trailing"  # recorded in config.json


def test_lcm_preset_runs_rlcm_timesteps(tiny_lcm_pipeline_dir, tmp_path):
    """Training and 8-step evaluation on RLCM's rule, not diffusers' LCMScheduler's."""
    policy = load_policy(tiny_lcm_pipeline_dir)
    plan = _plan("lcm", tiny_lcm_pipeline_dir, tmp_path / "run")
    assert _timesteps(policy, plan.eval_settings(seed=0).sampler_config(8)) == RLCM_EIGHT_STEPS
    assert _timesteps(policy, plan.eval_settings(seed=0).sampler_config(1)) == [999]
    job = _job(plan, tmp_path / "run")
    for algo, config in plan.configs.items():
        assert _timesteps(policy, training_sampler_config(config, job)) == RLCM_EIGHT_STEPS, algo
    assert plan.config_json()["timestep_spacing"] == "skipping"


def test_every_preset_names_its_timestep_spacing():
    """DDIM trailing, LCM skipping; a flow model's sigmas are its own scheduler's (None)."""
    for name, preset in PRESETS.items():
        expected = {"ddim": "trailing", "lcm": "skipping", "flow": None}[preset().sampler]
        assert preset().timestep_spacing == expected, name


def test_gpu_presets_train_on_the_published_animals_and_hold_out_others():
    """DDPO's, SDPO's and RLCM's simple_animals list (the same 45 names) is the training set;
    validation and test prompts are animals outside it and outside each other."""
    assert len(SIMPLE_ANIMALS) == len(set(SIMPLE_ANIMALS)) == 45
    assert SIMPLE_ANIMALS[:3] == ("cat", "dog", "horse") and SIMPLE_ANIMALS[-1] == "kangaroo"
    for name in GPU_PRESETS:
        preset = PRESETS[name]()
        assert preset.train_prompts == SIMPLE_ANIMALS, name
        train, val, test = set(preset.train_prompts), set(preset.val_prompts), set(preset.eval_prompts)
        assert len(val) == len(test) == 5
        assert not (train & val or train & test or val & test), name


def test_sd_turbo_samples_32_pairs_per_gpu_on_the_papers_4_gpus_per_epoch():
    """sdpo config/config_sdpo.py:20-21: 8 prompts x 4 batches per GPU, each sampled twice,
    on 4 GPUs (README.md:84): the run's budget on any number of processes."""
    preset = PRESETS["sd-turbo"]()
    assert (preset.trajectories_per_epoch, preset.paper_gpus) == (64 * 4, 4)
    assert preset.epochs == 100 and preset.sample_batch_size == 8
    assert (preset.model, preset.num_steps, preset.guidance_scale, preset.eta) == ("stabilityai/sd-turbo", 50, 1.0, 1.0)


SDPO_PAPER = {
    # reward: (lr, train batch, accumulation, epochs, SDPO's optimizer updates per epoch)
    "aesthetic": (1e-4, 2, 8, 100, 100),
    "imagereward": (5e-5, 1, 32, 200, 50),
    "hpsv2": (5e-5, 1, 32, 200, 50),
    "hpsv2.1": (5e-5, 1, 32, 200, 50),
    "pickscore": (6e-5, 1, 16, 200, 100),
}


@pytest.mark.parametrize("reward", sorted(SDPO_PAPER))
def test_sd_turbo_follows_the_sdpo_config_of_each_reward(reward):
    """lr, minibatch, accumulation and epochs per reward (sdpo config/config_sdpo.py), given
    to every algorithm; with 32 pairs per epoch SDPO makes the reference's updates per
    epoch (pairs / batch x K steps / accumulation), and every algorithm's epoch ends on an
    update boundary."""
    lr, batch, accumulation, epochs, sdpo_updates = SDPO_PAPER[reward]
    assert SD_TURBO_REWARD_SETTINGS[reward] == (lr, batch, accumulation, epochs)
    preset = PRESETS["sd-turbo"]()
    configs = preset_algo_configs(preset, reward)
    for algo in ALGORITHMS:
        config = getattr(configs, algo)
        assert (config.learning_rate, config.train_batch_size, config.gradient_accumulation_steps) == (
            lr, batch * 4, accumulation), algo  # the paper's minibatch per GPU on its 4 GPUs
        check_batch_sizes(algo, config, preset.trajectories_per_epoch, 1)
    assert epoch_budget(configs.sdpo, preset.trajectories_per_epoch)["optimizer_updates"] == sdpo_updates


SD_TURBO_BEFORE_THE_PRESET_HELD_THEM = {
    # reward: ({algorithm: (lr, train batch, accumulation)}, epochs), as the runner made them
    # when it special-cased sd-turbo (main at 1f20fca: `preset_algo_configs` and `make_plan`).
    **{reward: ({algo: (lr, batch, accumulation) for algo in ALGORITHMS}, epochs)
       for reward, (lr, batch, accumulation, epochs) in [
           ("aesthetic", (1e-4, 2, 8, 100)), ("imagereward", (5e-5, 1, 32, 200)), ("hpsv2", (5e-5, 1, 32, 200)),
           ("hpsv2.1", (5e-5, 1, 32, 200)), ("pickscore", (6e-5, 1, 16, 200))]},
    # A reward outside the paper's: each algorithm's published settings, the preset's 100 epochs.
    "tiny-align": ({"ddpo": (3e-4, 1, 1), "rebel": (1e-4, 2, 4), "d3po": (3e-5, 1, 1), "sdpo": (1e-4, 2, 8),
                    "grpo": (3e-4, 1, 4), "draft": (1e-3, 8, 4), "nft": (3e-4, 1, 16),
                    # AWM and MixGRPO, added after the preset held them: their own lr and
                    # minibatch, and AWM the preset's accumulation of 4 (see sd_turbo).
                    "awm": (3e-4, 1, 4), "mixgrpo": (1e-5, 1, 1)}, 100),
}


@pytest.mark.parametrize("reward", sorted(SD_TURBO_BEFORE_THE_PRESET_HELD_THEM))
def test_sd_turbo_configs_are_the_special_cased_runners(reward):
    """The sd-turbo preset's own reward_overrides and reward_epochs give every algorithm the
    settings and budget the runner's sd-turbo special case gave it."""
    settings, epochs = SD_TURBO_BEFORE_THE_PRESET_HELD_THEM[reward]
    preset = PRESETS["sd-turbo"]()
    configs = preset_algo_configs(preset, reward)
    assert {algo: (getattr(configs, algo).learning_rate, getattr(configs, algo).train_batch_size // 4,
                   getattr(configs, algo).gradient_accumulation_steps) for algo in ALGORITHMS} == settings
    assert (configs.grpo.group_size, configs.nft.group_size) == (2, 2)
    assert preset.epochs_for(reward) == epochs


@pytest.mark.parametrize("overrides, message", [
    (dict(algo_overrides={"ddpo": {"learning_rte": 1e-3}}),
     r"preset sd-turbo: algo_overrides\['ddpo'\] sets 'learning_rte', not a field of DDPOConfig"),
    (dict(reward_overrides={"pickscore": {"sdpo": {"train_batch": 2}}}),
     r"preset sd-turbo: reward_overrides\['pickscore'\]\['sdpo'\] sets 'train_batch', not a field of SDPOConfig"),
    (dict(algo_overrides={"dpo": {"learning_rate": 1e-3}}),
     r"preset sd-turbo: algo_overrides names algorithm 'dpo', which is not registered"),
])
def test_a_preset_override_that_names_no_config_field_is_refused(overrides, message):
    """A misspelt key would otherwise be dropped (or fail later, far from the preset)."""
    with pytest.raises(ValueError, match=message):
        replace(PRESETS["sd-turbo"](), **overrides)


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_preset_budgets_fit_every_algorithm(name):
    """`--algos all` passes the batch-size checks at each GPU preset's default budget."""
    preset = PRESETS[name]()
    configs = preset_algo_configs(preset, preset.reward)
    for algo in ALGORITHMS:
        check_batch_sizes(algo, getattr(configs, algo), preset.trajectories_per_epoch, 1)


def test_sd15_follows_ddpo_aesthetic_config():
    """ddpo-pytorch config/dgx.py:aesthetic on config/base.py: 200 epochs of 8 x 4
    trajectories per GPU, minibatch 4, accumulation 4 (2 updates per epoch), stat tracker
    32/16, lr 3e-4, clip range 1e-4, CFG 5, K = 50."""
    preset = PRESETS["sd15"]()
    assert (preset.epochs, preset.trajectories_per_epoch, preset.paper_gpus) == (200, 32 * 8, 8)
    assert (preset.num_steps, preset.guidance_scale, preset.eta, preset.sampler) == (50, 5.0, 1.0, "ddim")
    ddpo = preset_algo_configs(preset, preset.reward).ddpo
    assert (ddpo.train_batch_size, ddpo.gradient_accumulation_steps) == (4 * 8, 4)
    assert (ddpo.tracker_buffer_size, ddpo.tracker_min_count) == (32, 16)
    assert (ddpo.learning_rate, ddpo.clip_range, ddpo.adv_clip_max, ddpo.max_grad_norm) == (3e-4, 1e-4, 5.0, 1.0)
    assert (ddpo.lora_rank, ddpo.lora_alpha) == (4, 4.0)
    assert epoch_budget(ddpo, preset.trajectories_per_epoch)["optimizer_updates"] == 2


def test_lcm_follows_rlcm_aesthetic_config():
    """rlcm conf/task/aesthetic.yaml and conf/config.yaml: a stepzoo epoch is one RLCM
    sampling round (8 prompts, REBEL's 8 pairs), 1000 of them = 100 RLCM epochs x 10 rounds;
    one REBEL update per round; PPO (DDPO) with gradient norm 5 and advantage clip 10, REBEL
    unclipped; LoRA r8/alpha 8, lr 1e-4, Adam (no weight decay) for every algorithm."""
    preset = PRESETS["lcm"]()
    assert (preset.epochs, preset.trajectories_per_epoch, preset.paper_gpus) == (1000, 16 * 4, 4)
    assert preset.epochs * preset.trajectories_per_epoch == 100 * 10 * 8 * 2 * 4
    assert (preset.num_steps, preset.guidance_scale, preset.sampler) == (8, 8.0, "lcm")
    configs = preset_algo_configs(preset, preset.reward)
    for algo in ("sdpo", "ddpo", "rebel", "d3po"):
        config = getattr(configs, algo)
        assert (config.lora_rank, config.lora_alpha, config.learning_rate, config.weight_decay) == (
            8, 8.0, 1e-4, 0.0), algo
    rebel, ddpo = configs.rebel, configs.ddpo
    assert (rebel.train_batch_size, rebel.gradient_accumulation_steps, rebel.max_grad_norm) == (2 * 4, 4, None)
    assert (rebel.tracker_buffer_size, rebel.tracker_min_count) == (32, 16)
    assert epoch_budget(rebel, preset.trajectories_per_epoch)["optimizer_updates"] == 1
    assert (ddpo.train_batch_size, ddpo.gradient_accumulation_steps) == (2 * 4, 4)
    assert (ddpo.max_grad_norm, ddpo.adv_clip_max, ddpo.clip_range) == (5.0, 10.0, 1e-4)
    assert (ddpo.tracker_buffer_size, ddpo.tracker_min_count) == (32, 16)
    # RLCM's PPO: one update per 8 trajectories.
    assert epoch_budget(ddpo, preset.trajectories_per_epoch)["optimizer_updates"] == 2


def test_a_preset_names_the_algorithms_a_run_trains_by_default(tmp_path):
    """Without --algos the tiny preset trains the SDPO paper's four (`make bench`'s budget);
    --algos all trains every registered algorithm that can learn the reward; a preset that
    names none trains them all."""
    def planned(*flags: str) -> list[str]:
        return make_plan(parse_args(["--out", str(tmp_path / "run"), *flags])).algos

    assert planned() == ["ddpo", "rebel", "d3po", "sdpo"]
    assert planned("--algos", "all") == list(ALGORITHMS)
    assert planned("--algos", "grpo,nft") == ["grpo", "nft"]
    assert not PRESETS["sd-turbo"]().algos


def test_a_task_with_its_own_measured_budget_plans_it_unless_flags_say_otherwise(tmp_path):
    """tiny-turbo's alignment task trains 20 epochs evaluated every 2 (its measured budget, 10
    points of the curve); the default task keeps the verdict protocol's 40 every 4; the flags win."""
    def planned(preset: str, *flags: str) -> tuple[int, int]:
        plan = make_plan(parse_args(["--preset", preset, "--out", str(tmp_path / "run"), *flags]))
        return plan.epochs, plan.eval_every

    assert planned("tiny-turbo") == (40, 4)
    assert planned("tiny-turbo", "--reward", "tiny-align") == (20, 2)
    assert planned("tiny-turbo", "--reward", "tiny-align", "--epochs", "8", "--eval-every", "4") == (8, 4)
    assert planned("tiny-flow-turbo", "--reward", "tiny-align") == (40, 4)


FLOW_PRESETS = [name for name in GPU_PRESETS if PRESETS[name]().sampler == "flow"]


@pytest.fixture(scope="module")
def tiny_flow_folders(tmp_path_factory) -> dict[str, str]:
    """Tiny random pipelines of each flow preset's shape: SD3 (scheduler shift 3, SD3.5's)
    and FLUX.1-schnell (unshifted)."""
    from zoo.tiny.flow import build_random_flow_pipeline
    from zoo.tiny.flux import build_random_flux_pipeline

    root = tmp_path_factory.mktemp("flow-presets")
    return {"sd3.5-medium": str(build_random_flow_pipeline(root / "sd3", seed=0)),
            "flux-schnell": str(build_random_flux_pipeline(root / "flux", seed=0))}


def test_flow_presets_are_flow_gpu_presets():
    assert FLOW_PRESETS == ["sd3.5-medium", "flux-schnell"]


SD3_MIN_SIGMA = 3 * 0.001 / (1 + 2 * 0.001)
"""Shift 3's σ at t = 1: diffusers' FlowMatchEulerDiscreteScheduler spaces K values of s from
1 down to its (already shifted) smallest σ, then shifts them: σ = 3s / (1 + 2s)."""


@pytest.mark.parametrize("name, sigmas", [
    # SD3.5's shift 3 on K = 10.
    ("sd3.5-medium", [3 * s / (1 + 2 * s) for s in torch.linspace(1, SD3_MIN_SIGMA, 10, dtype=torch.float64).tolist()]),
    # FLUX.1-schnell unshifted on K = 4 (FluxPipeline's linspace(1, 1/K, K)).
    ("flux-schnell", [1.0, 0.75, 0.5, 0.25]),
])
def test_flow_presets_train_on_the_sde_and_evaluate_on_the_ode(name, sigmas, tiny_flow_folders, tmp_path):
    """Every algorithm trains on the preset's SDE (noise level 0.7, K, guidance) at the
    model's own sigmas, with Flow-GRPO's LoRA on the joint attention; evaluation samples
    the ODE (noise level 0) at every step count."""
    from zoo.flow_policy import FLOW_LORA_TARGETS

    folder = tiny_flow_folders[name]
    plan = _plan(name, folder, tmp_path / "run")
    policy = load_policy(folder, resolution=32)
    job = _job(plan, tmp_path / "run")
    for algo, config in plan.configs.items():
        sampler_config = training_sampler_config(config, job)
        assert (sampler_config.kind, sampler_config.eta, sampler_config.num_steps) == ("flow", 0.7, len(sigmas)), algo
        assert (config.lora_rank, config.lora_alpha, tuple(config.lora_target_modules)) == (32, 64.0, FLOW_LORA_TARGETS)
        schedule = TrajectorySampler(policy, sampler_config).kernel
        assert schedule.sigma.tolist() == pytest.approx(sigmas, abs=1e-6), algo
    evaluation = plan.eval_settings(seed=0)
    assert evaluation.eta == 0.0 and evaluation.sampler_config(1).kind == "flow"
    assert plan.config_json()["timestep_spacing"] is None


def test_sd35_medium_follows_flow_grpo_pickscore_config():
    """flow_grpo config/grpo.py:pickscore_sd3_4gpu (ac4c86e) on config/base.py: SD3.5 Medium,
    PickScore, 512px, K = 10, CFG 4.5, noise level 0.7, fp16; 8 trajectories a sampling call
    x 8 calls per GPU on its 4 GPUs, groups of 16; minibatch 8 x accumulation 4 = 32 trajectories per GPU, two
    updates an epoch; GRPO with β 0.01, the batch's std and int(0.99 x 10) = 9 trained steps;
    LoRA r32/alpha 64, lr 3e-4, weight decay 1e-4."""
    preset = PRESETS["sd3.5-medium"]()
    assert (preset.model, preset.reward, preset.resolution) == ("stabilityai/stable-diffusion-3.5-medium", "pickscore", 512)
    assert (preset.sampler, preset.num_steps, preset.guidance_scale, preset.eta) == ("flow", 10, 4.5, 0.7)
    assert (preset.trajectories_per_epoch, preset.sample_batch_size, preset.mixed_precision) == (64 * 4, 16, "fp16")
    configs = preset_algo_configs(preset, preset.reward)
    grpo = configs.grpo
    assert (grpo.group_size, grpo.train_batch_size, grpo.gradient_accumulation_steps) == (16, 1 * 4, 2)
    assert (grpo.beta, grpo.global_std, grpo.window_size, grpo.window_range) == (0.01, True, 9, (0, 9))
    assert (grpo.clip_range, grpo.adv_clip_max, grpo.max_grad_norm) == (1e-4, 5.0, 1.0)
    for algo in ALGORITHMS:
        config = getattr(configs, algo)
        assert (config.learning_rate, config.weight_decay, config.lora_rank, config.lora_alpha) == (3e-4, 1e-4, 32, 64.0)
        if algo != "sdpo":  # SDPO updates at every denoising step (its reference's loop)
            assert epoch_budget(config, preset.trajectories_per_epoch)["optimizer_updates"] == (
                1 if algo in ("nft", "awm") else 2), algo


def test_flux_schnell_is_few_step_flow_without_guidance():
    """4 steps (black-forest-labs/flux cli.py:165), no CFG (guidance-distilled, no guidance
    input), bf16 (its reference's precision), Flow-GRPO's noise level and loops: GRPO
    trains int(0.99 x 4) = 3 steps."""
    preset = PRESETS["flux-schnell"]()
    assert (preset.model, preset.resolution, preset.mixed_precision) == ("black-forest-labs/FLUX.1-schnell", 512, "bf16")
    assert (preset.sampler, preset.num_steps, preset.guidance_scale, preset.eta) == ("flow", 4, 1.0, 0.7)
    grpo = preset_algo_configs(preset, preset.reward).grpo
    assert (grpo.group_size, grpo.window_size, grpo.window_range) == (16, 3, (0, 3))
    assert epoch_budget(grpo, preset.trajectories_per_epoch)["optimizer_updates"] == 2
