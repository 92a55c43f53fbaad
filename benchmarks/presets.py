"""Named settings of the benchmark: the model, prompts, reward, sampler and budget.

A preset fixes everything that must be equal across algorithms for a fair comparison:
the base model, the training, validation and test prompts, the sampler (kind, K,
guidance, eta, timestep spacing), the epoch budget, the trajectories sampled per epoch
and the tuning grid that every algorithm gets alike. Algorithm hyperparameters keep each method's
published defaults, except where a preset follows a paper's own settings or a tuning run
selected them (`algo_overrides`). Presets are plain functions, listed in PRESETS.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import zoo.tiny
from zoo.hub import UNPINNED
from zoo.registry import ALGORITHMS
from zoo.sdpo import PAPER_REWARD_SETTINGS

TINY_ASSETS = Path(zoo.tiny.__file__).parent / "assets"

# The training prompts of every GPU preset's paper: DDPO's, SDPO's and RLCM's (and D3PO's)
# "simple_animals" lists hold these 45 names in this order (kvablack/ddpo-pytorch
# ddpo_pytorch/assets/simple_animals.txt, ZiyiZhang27/sdpo sdpo_pytorch/assets/simple_animals.txt,
# Owen-Oertell/rlcm lcm_rl_pytorch/datasets/simple_animals.txt, yk7333/d3po
# d3po_pytorch/assets/simple_animals.txt), and their aesthetic runs train on them
# (ddpo-pytorch config/dgx.py:55, sdpo config/config_sdpo.py:26, rlcm
# lcm_rl_pytorch/conf/task/aesthetic.yaml:24).
SIMPLE_ANIMALS = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
    "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle",
    "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat",
    "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly",
    "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
)
# Held out: animals that no reference list holds, so the whole published training list
# stays in training and no held-out prompt was ever trained on. Validation prompts are
# what `benchmarks.tune` selects on; test prompts are the reported tables'.
VALIDATION_ANIMALS = ("elephant", "giraffe", "owl", "penguin", "crocodile")
TEST_ANIMALS = ("panda", "koala", "flamingo", "parrot", "octopus")


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    """Hub id or local diffusers folder of the base model."""
    model_revision: str
    """The hub revision of `model` that is downloaded and loaded (ignored for a folder)."""
    reward: str
    """Default training reward (a registry name or a weighted sum)."""
    eval_rewards: tuple[str, ...]
    """Rewards scored at evaluation only, by default (to catch reward hacking)."""
    train_prompts: tuple[str, ...]
    val_prompts: tuple[str, ...]
    """Validation prompts: `benchmarks.tune` selects hyperparameters on them; disjoint from
    the test prompts, so the reported table is never scored where it was tuned."""
    eval_prompts: tuple[str, ...]
    """Test prompts: the held-out prompts of the reported tables."""
    sampler: str
    """Training and evaluation sampler: "ddim" or "lcm" (ε-prediction UNets), "flow"
    (flow-matching transformers: `eta` is the SDE's noise level)."""
    num_steps: int
    """Sampling steps K during training."""
    guidance_scale: float
    eta: float
    timestep_spacing: str | None
    """Where the sampler's timesteps sit, in training and at every evaluation step count
    (`zoo.kernels.SamplerConfig.timestep_spacing`): "trailing" for every DDIM preset, so
    that 1- and 2-step samples start at t = 999 whatever the base model's scheduler config
    says (Stable Diffusion 1.5's "leading" starts them at t = 1 and 501); None keeps the
    model's config."""
    epochs: int
    trajectories_per_epoch: int
    """Trajectories sampled per epoch by the run, shared by its processes (groups x group
    size): a GPU preset's is its paper's per-GPU batch times the paper's GPU count."""
    sample_batch_size: int
    """Trajectories per sampling call (their rewards overlap the next call's sampling)."""
    eval_every: int
    eval_samples_per_prompt: int
    eval_batch_size: int
    mixed_precision: str
    algo_overrides: dict[str, dict] = field(default_factory=dict)
    """Per-algorithm config fields that this preset's paper set or its tuning run selected
    (name -> {field: value}); every name and field must exist (`__post_init__`)."""
    algos: tuple[str, ...] = ()
    """The algorithms a run trains when --algos is not given; empty: every registered one."""
    reward_overrides: dict[str, dict[str, dict]] = field(default_factory=dict)
    """Training reward -> algorithm -> config fields applied over `algo_overrides` when the
    run trains on that reward: what a tuning run selected for that task (learning rates
    differ by task; one table per task stands on its own selection), or what a paper set
    per task (`sd_turbo`)."""
    groups_per_prompt: int = 1
    """Groups sampled from each prompt drawn per epoch, side by side (`--groups-per-prompt`,
    `benchmarks.rollout.draw_prompt_ids`); 1 draws each group's prompt on its own, as the
    papers' loops do."""
    resolution: int | None = None
    """Image side in pixels for a flow-matching model (`FlowPolicy`); None keeps the
    pipeline's default. UNet models sample at their own sample_size."""
    tuning_grid: dict[str, tuple] = field(default_factory=dict)
    """Config field -> candidate values: `benchmarks.tune` trains every algorithm at every
    combination (the same number of configurations for each) and keeps the best by
    `TUNING_RULE`."""
    eval_split: str = "test"
    """`benchmarks.run --eval-split`'s default: "test", or "both" (validation prompts beside
    the test prompts at every evaluation, to choose the reported epoch on)."""
    curve_samples_per_prompt: int | None = None
    """`benchmarks.run --curve-samples-per-prompt`'s default: samples per prompt of the
    evaluations before the last epoch; None: `eval_samples_per_prompt`."""
    flow_sde: str = "flow-grpo"
    """The flow sampler's SDE, "flow-grpo" or "dance-grpo" (`zoo.kernels.SamplerConfig.flow_sde`),
    set for every algorithm like `eta`, which it reinterprets; unused by the other samplers."""
    reward_epochs: dict[str, int] = field(default_factory=dict)
    """Training reward -> epochs, where the preset's paper trains a task for another budget
    than `epochs`, or where a budget measured on the task chose another (`epochs_for`)."""
    reward_eval_every: dict[str, int] = field(default_factory=dict)
    """Training reward -> epochs between evaluations, where the task's own budget
    (`reward_epochs`) would otherwise give its curve another number of points (`eval_every_for`)."""
    paper_gpus: int = 1
    """The GPU count of the configuration the preset's paper published, whose batch sizes
    are per GPU: every algorithm's minibatch (`train_batch_size`, per GPU as the configs and
    overrides cite it) is multiplied by it (`benchmarks.cli.preset_algo_configs`), as
    `trajectories_per_epoch` is, so that a run's budget is the paper's global one on any
    number of processes. 1: a budget of stepzoo's own."""

    def __post_init__(self) -> None:
        """Refuses an override of an unregistered algorithm or of a field its config lacks,
        which applying the overrides (`benchmarks.cli.preset_algo_configs`) would otherwise
        have to drop or fail on far from here."""
        named = [("algo_overrides", self.algo_overrides)]
        named += [(f"reward_overrides[{reward!r}]", by_algo) for reward, by_algo in self.reward_overrides.items()]
        for where, by_algo in named:
            for algo, overrides in by_algo.items():
                if algo not in ALGORITHMS:
                    raise ValueError(
                        f"preset {self.name}: {where} names algorithm {algo!r}, which is not registered "
                        f"({', '.join(ALGORITHMS)}); fix it in benchmarks/presets.py"
                    )
                config_cls = ALGORITHMS[algo]
                unknown = sorted(overrides.keys() - {f.name for f in fields(config_cls) if f.init})
                if unknown:
                    raise ValueError(
                        f"preset {self.name}: {where}[{algo!r}] sets {', '.join(map(repr, unknown))}, not a field of "
                        f"{config_cls.__name__}; fix the key in benchmarks/presets.py"
                    )

    def epochs_for(self, reward: str) -> int:
        """The epoch budget of a run that trains on `reward` (without --epochs)."""
        return self.reward_epochs.get(reward, self.epochs)

    def eval_every_for(self, reward: str) -> int:
        """The epochs between evaluations of a run that trains on `reward` (without --eval-every)."""
        return self.reward_eval_every.get(reward, self.eval_every)


AWM_UNTUNED = {"awm": 2e-3}
"""AWM's learning rate on every tiny task until `benchmarks.tune --extend --algos awm` selects
one: the rate it learns JPEG compressibility at on `tiny` (tests/test_algo_awm.py), NFT's there."""


def tiny() -> Preset:
    """The embedded tiny world: runs the whole benchmark in minutes on 2 CPU cores."""
    from zoo.tiny import data

    # Equal updates: every algorithm takes 8 optimizer steps per epoch, each over 32
    # transitions (DDPO: 8 trajectories x 4 steps; D3PO, REBEL: 4 pairs x 4 steps; SDPO,
    # whose reference steps the optimizer per denoising step: 16 pairs x 1 step; NFT: 32
    # (x0, t) examples, 4 pairs x 4 timesteps).
    # Per-prompt baselines from the first epoch: 4 groups of each drawn prompt per epoch
    # (`groups_per_prompt`) and each stat tracker's min_count at the rewards a prompt gets in
    # one epoch (DDPO 4, pairs 8), so every advantage is its prompt's own statistics; with
    # the published 16 and one group per prompt, 83% (DDPO) and 75% (pairs) of the first
    # 10 epochs' advantages fell back to batch statistics (tests/test_groups_per_prompt.py).
    # DRaFT samples as it trains: 8 minibatches of 8 trajectories, each sampled with the
    # weights the last update left and trained on with one backward pass (through its last
    # K steps) and one update, so the same 64 trajectories and 8 updates per epoch, each
    # update from 8 trajectories x 4 steps = 32 sampled transitions (the last K of each
    # with gradients).
    loops = {
        "ddpo": {"train_batch_size": 8, "gradient_accumulation_steps": 1, "tracker_min_count": 4},
        "d3po": {"train_batch_size": 4, "gradient_accumulation_steps": 1},
        "rebel": {"train_batch_size": 4, "gradient_accumulation_steps": 1, "tracker_min_count": 8},
        "sdpo": {"train_batch_size": 4, "gradient_accumulation_steps": 4, "tracker_min_count": 8},
        # GRPO's baseline is all of a prompt's trajectories in the epoch: G = 2 with the 4
        # groups per prompt gives every drawn prompt 8 trajectories (8 prompts per epoch),
        # the pair algorithms' protocol; 4 groups of 2 x 4 steps per update. G = 4 or 8
        # would leave 4 or 2 prompts per epoch (and could not split an 8-trajectory test
        # budget into 4 groups per prompt).
        "grpo": {"group_size": 2, "train_batch_size": 4, "gradient_accumulation_steps": 1},
        # MixGRPO on GRPO's loop: its published group of 12 (from one x_T) divides neither 64
        # trajectories nor, with 4 groups per prompt, the micro runs' 8; pairs, 4 a minibatch,
        # one update each: 8 updates of 4 pairs x its window (at K = 4: steps 0 and 1).
        "mixgrpo": {"group_size": 2, "train_batch_size": 4, "gradient_accumulation_steps": 1},
        "draft": {"train_batch_size": 8, "gradient_accumulation_steps": 1},
        # NFT trains on (x0, t) examples, one backward pass each as a transition is for the
        # others (each also pays no-gradient passes of the old policy and of the base): 4
        # pairs x 4 timesteps = 32 per update. Pairs (group_size 2, not the reference's 24)
        # give 8 prompts per epoch with 8 rewards each for the per-prompt mean, as the pair
        # methods have.
        "nft": {"group_size": 2, "train_batch_size": 4, "gradient_accumulation_steps": 1},
        # AWM as NFT: 4 pairs x 4 timesteps = 32 (x0, t) examples per update, every sampling
        # step once (4 timesteps of the whole grid: its reference's 6 of the first
        # int(0.9·K) steps would train steps 0, 0, 1, 1, 2, 2 at K = 4, 48 examples an update
        # and never the last step).
        "awm": {"group_size": 2, "train_batch_size": 4, "gradient_accumulation_steps": 1,
                "train_timesteps": 4, "timestep_fraction": 1.0},
    }
    # Learning rates per task, each selected by `python -m benchmarks.tune` on the
    # validation prompts from the grid its folder's tuning.md shows, by the proxy's gold
    # (`benchmarks.tune.TUNING_RULE`); the published 1e-4 to 3e-4 move nothing in 640
    # trajectories.
    learning_rates = {
        # results/tune-tiny-tiny-aesthetic (the default task), seeds 100 and 101: one seed
        # selected 8e-3 / 4e-3 / 2e-3 / 1e-3 for DDPO / REBEL / D3PO / SDPO and the other
        # 2e-3 / 1e-3 / 2e-3 / 4e-3; only D3PO's choice survived a second seed. GRPO, NFT
        # and DRaFT (added later on the same grid and seeds) chose its lowest value.
        "tiny-aesthetic": {"ddpo": 2e-3, "d3po": 2e-3, "rebel": 2e-3, "sdpo": 2e-3,
                           "grpo": 1e-3, "nft": 1e-3, "draft": 1e-3, **AWM_UNTUNED},
        # results/tune-tiny-tiny-align, seeds 100 and 101: seed 100 alone chose SDPO 2e-3,
        # the two seeds 1e-3 (0.874 against 0.871 on the gold); the others held.
        "tiny-align": {"ddpo": 1e-3, "d3po": 1e-3, "rebel": 4e-3, "sdpo": 1e-3,
                       "grpo": 1e-3, "nft": 2e-3, "draft": 1e-3, **AWM_UNTUNED},
        # results/tune-tiny-jpeg_compressibility: tuned under the previous protocol (one
        # group per prompt, trackers' min_count 16) on the grid 1e-3 to 3e-2. GRPO and NFT
        # are not tuned on it: 2e-3 is the rate they were first run at, where NFT learns it
        # and GRPO does not (tests/test_learning.py; at the default task's 1e-3 NFT's gain
        # stayed within the base's spread, measured). DRaFT cannot train on JPEG, which has
        # no gradient. AWM, not tuned either, learns it at NFT's 2e-3 (tests/test_algo_awm.py).
        "jpeg_compressibility": {"ddpo": 3e-2, "d3po": 3e-3, "rebel": 1e-2, "sdpo": 1e-2,
                                 "grpo": 2e-3, "nft": 2e-3, **AWM_UNTUNED},
    }
    # MixGRPO is not tuned on any task: it trains at GRPO's rate (the same PPO-clip on a group).
    for rates in learning_rates.values():
        rates["mixgrpo"] = rates["grpo"]
    return Preset(
        name="tiny",
        model=str(TINY_ASSETS / "pipeline"),
        model_revision=UNPINNED,
        # The SDPO paper's main task in miniature: a learned aesthetic proxy, judged by the
        # pixel gold it approximates (scored automatically) and watched for prompt
        # alignment by the alignment gold. `--reward tiny-align` trains the alignment
        # task; `--reward jpeg_compressibility` DDPO's classic one.
        reward="tiny-aesthetic",
        eval_rewards=("tiny-aesthetic-gold", "tiny-align-gold"),
        train_prompts=tuple(data.train_captions()),
        val_prompts=tuple(data.validation_captions()),
        eval_prompts=tuple(data.test_captions()),
        sampler="ddim",
        # Trained at K=4: the base model's 4-step samples are already good (fidelity 0.91),
        # while 1 and 2 steps are not (0.20, 0.55): the step-generalization gap.
        num_steps=4,
        guidance_scale=_tiny_guidance(),
        eta=1.0,
        timestep_spacing="trailing",
        epochs=10,
        trajectories_per_epoch=64,
        groups_per_prompt=4,
        sample_batch_size=16,
        # Evaluation costs about as much as two training epochs here: every 5 epochs keeps
        # `make bench` under 10 minutes on 2 cores.
        eval_every=5,
        # 4 test prompts x 16: 64 images per cell.
        eval_samples_per_prompt=16,
        eval_batch_size=64,
        mixed_precision="no",
        algo_overrides={
            algo: {**loop, **({"learning_rate": learning_rates["tiny-aesthetic"][algo]}
                              if algo in learning_rates["tiny-aesthetic"] else {})}
            for algo, loop in loops.items()
        },
        reward_overrides={
            reward: {algo: {"learning_rate": lr} for algo, lr in rates.items()}
            for reward, rates in learning_rates.items() if reward != "tiny-aesthetic"
        },
        # A factor-2 grid over the window where the default task moves at all: at 1e-3 no
        # algorithm moved beyond noise, at the JPEG task's selections (3e-3 to 3e-2) all four
        # fell on both the proxy and the gold (measured on the validation prompts, seed 0).
        tuning_grid={"learning_rate": (1e-3, 2e-3, 4e-3, 8e-3)},
        # The SDPO paper's comparison, its main experiment in miniature: `make bench` stays
        # within 10 minutes on 2 cores; `--algos all` adds GRPO, NFT, DRaFT, AWM and MixGRPO.
        algos=("ddpo", "rebel", "d3po", "sdpo"),
    )


def tiny_flow() -> Preset:
    """The tiny world's flow-matching model (zoo/tiny/flow.py: an SD3-shaped transformer on
    the UNet world's VAE and text encoder, trained by rectified flow): the same prompts,
    tasks, budget, loops and tuning grid as `tiny`, sampled by Flow-GRPO's SDE."""
    from zoo.flow_policy import FLOW_LORA_TARGETS
    from zoo.tiny import FLOW_GUIDANCE

    base = tiny()
    # LoRA on the joint attention's image and text projections (Flow-GRPO's SD3 targets) for
    # every algorithm, at each algorithm's own rank.
    flow_lora = {"lora_target_modules": FLOW_LORA_TARGETS}
    # results/tune-tiny-flow-tiny-aesthetic and results/tune-tiny-flow-tiny-align: the tiny
    # grid, seeds 100 and 101, selected by the validation gold. JPEG is not tuned on this
    # model: it keeps the UNet world's selections (`tiny`'s reward_overrides). GRPO's aesthetic
    # rate was selected again after its replay detached the unconditional prediction
    # (`benchmarks.tune --preset tiny-flow --algos grpo --extend --redo`): 4e-3, where the
    # attached gradient had chosen 2e-3.
    aesthetic_rates = {"ddpo": 2e-3, "rebel": 1e-3, "d3po": 2e-3, "sdpo": 1e-3, "grpo": 4e-3, "draft": 1e-3, "nft": 4e-3,
                       **AWM_UNTUNED}
    align_rates = {"ddpo": 1e-3, "rebel": 1e-3, "d3po": 1e-3, "sdpo": 2e-3, "grpo": 2e-3, "draft": 2e-3, "nft": 1e-3,
                   **AWM_UNTUNED}
    # MixGRPO, untuned: GRPO's rates, as on `tiny`.
    aesthetic_rates["mixgrpo"], align_rates["mixgrpo"] = aesthetic_rates["grpo"], align_rates["grpo"]
    return replace(
        base,
        name="tiny-flow",
        model=str(TINY_ASSETS / "pipeline-flow"),
        sampler="flow",
        # Flow-GRPO's noise level (yifan123/flow_grpo ac4c86e, config/base.py:54); evaluation
        # samples the ODE (`benchmarks.plan.Plan.eval_settings`, as flow_grpo's
        # train_sd3.py:258 does).
        eta=0.7,
        guidance_scale=FLOW_GUIDANCE,
        # The model's FlowMatchEulerDiscreteScheduler places the sigmas (shift 3, SD3.5's).
        timestep_spacing=None,
        algo_overrides={
            algo: {**overrides, **flow_lora, "learning_rate": aesthetic_rates[algo]}
            for algo, overrides in base.algo_overrides.items()
        },
        reward_overrides={
            **base.reward_overrides,
            "tiny-align": {algo: {"learning_rate": rate} for algo, rate in align_rates.items()},
        },
    )


VERDICT_PROTOCOL = dict(
    # results/budget-tiny-turbo-tiny-aesthetic: at 80 epochs on the validation prompts the
    # best gold is reached by epoch 24 (D3PO; DRaFT by 8) and collapses after it, SDPO
    # plateaus from 32: 40 epochs (2560 trajectories, 4x `tiny`'s) hold every peak. On the
    # flow student (results/budget-tiny-flow-turbo-tiny-aesthetic) REBEL, D3PO, NFT and DRaFT
    # peak by 16 and DDPO plateaus from 40; SDPO, GRPO and AWM still rise at their untuned
    # rates, which the tuning on this budget chooses again.
    epochs=40,
    # 10 points of the curve, each on both prompt sets: the reported epoch is chosen on the
    # validation prompts (`benchmarks.peak`); the intermediate points on half the images.
    eval_every=4,
    eval_split="both",
    curve_samples_per_prompt=8,
)
"""The budget and evaluation of the few-step presets' verdict (issue 27): curves to the peak."""


def tiny_turbo() -> Preset:
    """The tiny world's few-step UNet (`zoo.tiny.PIPELINE_TURBO`: `tiny`'s base model distilled
    to sample in 1 to 8 steps without guidance, zoo/tiny/turbo.py), trained with the sampler
    the SDPO paper trains sd-turbo with: DDIM, eta 1, trailing spacing, no classifier-free
    guidance (sdpo config/base_sdpo.py:48, :50; the `sd-turbo` preset). Its own: the verdict's
    budget and evaluation (`VERDICT_PROTOCOL`) and the default task's learning rates, tuned on
    this model. Everything else is `tiny`'s: prompts, tasks, K = 4, loops, grid, and the other
    tasks' learning rates (tuned on the base model)."""
    from zoo.tiny import TURBO_GUIDANCE

    base = tiny()
    # results/tune-tiny-turbo-tiny-aesthetic: `benchmarks.tune --preset tiny-turbo --epochs 40
    # --curve-points 10` on the tiny grid, seeds 100 and 101, by PEAK_RULE (validation gold at
    # the best of 10 epochs): DDPO 8e-3 (epoch 28), REBEL 1e-3 (epoch 4), D3PO 2e-3 (28), SDPO
    # 2e-3 (32). AWM and MixGRPO, added later on the same grid, seeds and rule (`benchmarks.tune
    # --preset tiny-turbo --algos awm,mixgrpo --curve-points 10 --curve-samples-per-prompt 16
    # --extend`): AWM 1e-3 (epoch 16), MixGRPO 2e-3 (epoch 32). GRPO, NFT and DRaFT are not
    # tuned on this model: they keep `tiny`'s rates.
    aesthetic_rates = {"ddpo": 8e-3, "rebel": 1e-3, "d3po": 2e-3, "sdpo": 2e-3, "awm": 1e-3, "mixgrpo": 2e-3}
    return replace(
        base, name="tiny-turbo", model=str(TINY_ASSETS / "pipeline-turbo"), guidance_scale=TURBO_GUIDANCE,
        algo_overrides={algo: {**fields, **({"learning_rate": aesthetic_rates[algo]} if algo in aesthetic_rates else {})}
                        for algo, fields in base.algo_overrides.items()},
        **VERDICT_PROTOCOL,
        # results/budget-tiny-turbo-tiny-align (80 epochs, validation prompts, every 8): every
        # algorithm's best alignment gold is by epoch 16 (MixGRPO's at 64, level within 0.008
        # from 8); 20 epochs hold every peak, at the protocol's 10 points of the curve.
        reward_epochs={"tiny-align": 20},
        reward_eval_every={"tiny-align": 2},
    )


def tiny_flow_turbo() -> Preset:
    """The tiny world's few-step flow model (`zoo.tiny.PIPELINE_FLOW_TURBO`, distilled from
    `tiny-flow`'s), trained as `flux-schnell` is: Flow-GRPO's SDE at noise level 0.7, K = 4,
    no classifier-free guidance (FLUX.1-schnell has none); evaluated on the Euler ODE, as
    every flow preset. Its own: the verdict's budget and evaluation (`VERDICT_PROTOCOL`,
    which results/budget-tiny-flow-turbo-tiny-aesthetic chose for this model too) and the
    default task's learning rates tuned on this model. Everything else is `tiny-flow`'s
    (the other algorithms' and tasks' rates tuned on the base flow model)."""
    from zoo.tiny import TURBO_GUIDANCE

    base = tiny_flow()
    # results/tune-tiny-flow-turbo-tiny-aesthetic: `benchmarks.tune --preset tiny-flow-turbo
    # --seeds 100,101 --curve-points 10` on the tiny grid, by PEAK_RULE: DDPO 4e-3 (epoch 40,
    # still rising there; 8e-3 peaks at 16 lower), REBEL 1e-3 (epoch 16), D3PO 2e-3 (8), SDPO
    # 1e-3 (36); then (`--algos grpo,nft,awm,mixgrpo --extend`) GRPO 2e-3 (36), NFT 1e-3 (32),
    # AWM 1e-3 (36), MixGRPO 1e-3 (32): the last three at the grid's lowest value, so the grid
    # went one step lower (`tuning_grid` below, 5e-4 run for every algorithm, `--resume`):
    # AWM 5e-4 (36) and MixGRPO 5e-4 (40, still rising, at the new grid's edge); the others
    # unchanged. DRaFT keeps `tiny-flow`'s until tuned here.
    aesthetic_rates = {"ddpo": 4e-3, "rebel": 1e-3, "d3po": 2e-3, "sdpo": 1e-3, "grpo": 2e-3, "nft": 1e-3,
                       "awm": 5e-4, "mixgrpo": 5e-4}
    return replace(
        base, name="tiny-flow-turbo", model=str(TINY_ASSETS / "pipeline-flow-turbo"), guidance_scale=TURBO_GUIDANCE,
        # One step below the tiny grid: three algorithms peaked at its lowest value on this model.
        tuning_grid={"learning_rate": (5e-4, *base.tuning_grid["learning_rate"])},
        algo_overrides={algo: {**fields, **({"learning_rate": aesthetic_rates[algo]} if algo in aesthetic_rates else {})}
                        for algo, fields in base.algo_overrides.items()},
        **VERDICT_PROTOCOL,
    )


def _tiny_guidance() -> float:
    from zoo.tiny import DEFAULT_GUIDANCE

    return DEFAULT_GUIDANCE


NFT_GPU_GROUP = {"group_size": 2}
"""NFT's reference samples 24 images of each of 48 prompts an epoch on 8 GPUs (NVlabs/
DiffusionNFT 24af555, config/nft.py:28-29, :31-46); a GPU preset's 16 to 64 trajectories per
process hold no group of 24, so NFT samples pairs there, and its per-prompt mean pools the
pair with every other group of the prompt drawn in the epoch. AWM's reference samples groups
of 24 too (scxue/advantage_weighted_matching be51372, config/dgx_awm.py:323): the same pairs."""


# The GPU counts of the published configurations, whose batch sizes are per GPU (`Preset.paper_gpus`).
SDPO_GPUS = 4  # ZiyiZhang27/sdpo fcee34d README.md:84 ("optimized for 4x GPUs")
RLCM_GPUS = 4  # Owen-Oertell/rlcm b8330ed README.md:61 ("4 RTX a6000 gpus for each of the tasks")
DDPO_GPUS = 8  # kvablack/ddpo-pytorch 1958463 config/dgx.py:18 ("the DGX machine I used had 8 GPUs")
FLOW_GRPO_GPUS = 4  # yifan123/flow_grpo ac4c86e config/grpo.py:185 (pickscore_sd3_4gpu: gpu_number=4)


def _published(**settings) -> Preset:
    """What the GPU presets share: the published animal prompts (held-out animals for
    validation and test), the default reward (aesthetic, each paper's headline task), 8
    trajectories per sampling call (sample batch 8 in all three papers' configs) and the
    evaluation, which is stepzoo's own: none of the references scores held-out prompts."""
    shared = dict(
        reward="aesthetic",
        eval_rewards=(),
        train_prompts=SIMPLE_ANIMALS,
        val_prompts=VALIDATION_ANIMALS,
        eval_prompts=TEST_ANIMALS,
        # sdpo config/config_sdpo.py:20, ddpo-pytorch config/dgx.py:19, rlcm
        # lcm_rl_pytorch/conf/task/aesthetic.yaml:8 (a speed setting here, not a result one).
        sample_batch_size=8,
        eval_samples_per_prompt=16,  # stepzoo's
        eval_batch_size=16,  # stepzoo's
    )
    return Preset(**{**shared, **settings})


def sd_turbo() -> Preset:
    """The SDPO paper (ZiyiZhang27/sdpo at fcee34d, `config/config_sdpo.py` on
    `config/base_sdpo.py`): sd-turbo, DDIM eta 1, K = 50, no CFG, fp16, LoRA r4 (the
    defaults of every algorithm's config). lr, minibatch, accumulation and epochs per reward
    are `SD_TURBO_REWARD_SETTINGS`, which `reward_overrides` gives every algorithm alike
    (and `reward_epochs` the budget): stepzoo shares them, where the paper's baselines had
    settings the repository does not hold."""
    return _published(
        name="sd-turbo",
        model="stabilityai/sd-turbo",  # sdpo config/config_sdpo.py:10
        model_revision=UNPINNED,  # to be pinned to a commit hash (zoo.hub.UNPINNED)
        sampler="ddim",  # sdpo scripts/train_sdpo.py:118 (DDIMScheduler from sd-turbo's scheduler config)
        # train_sdpo.py:118 keeps sd-turbo's scheduler config, whose spacing is "trailing"
        # (K = 50: t = 999, 979, ..., 19); explicit here so that no model file decides it.
        timestep_spacing="trailing",
        num_steps=50,  # sdpo config/config_sdpo.py:13
        guidance_scale=1.0,  # sdpo config/base_sdpo.py:50 (and train.cfg = False, :88)
        eta=1.0,  # sdpo config/base_sdpo.py:48
        epochs=100,  # sdpo config/config_sdpo.py:15 (aesthetic; 200 for the other rewards, :38, :53, :68)
        # 32 pairs per GPU per epoch: 8 prompts per batch (config_sdpo.py:20) x 4 batches
        # (:21), each prompt sampled twice from one x_T (scripts/train_sdpo.py:479, :489).
        # Shared by every algorithm: DDPO samples 64 single trajectories per GPU.
        trajectories_per_epoch=64 * SDPO_GPUS,
        paper_gpus=SDPO_GPUS,
        eval_every=10,  # stepzoo's (the reference saves a checkpoint every epoch, base_sdpo.py:20)
        mixed_precision="fp16",  # sdpo config/base_sdpo.py:24
        # No SDPO overrides: SDPOConfig's defaults are the reference's (LoRA rank 4 with
        # diffusers' LoRAAttnProcessor default, scripts/train_sdpo.py:142; clip range 1e-4,
        # base_sdpo.py:92; advantage clip 5, :90; grad norm 1.0, :79; weight decay 1e-4,
        # :72; λ 0.99, :99; γ 0.99, :57; stat tracker 32/16, config_sdpo.py:27-30), and
        # lr, minibatch and accumulation come per reward from SD_TURBO_REWARD_SETTINGS
        # (`reward_overrides`).
        # GRPO: those minibatches and accumulations count the paper's 32 pairs; GRPO's default
        # 8 trajectories per group would make 8 groups, fewer than one update spans (16 for
        # aesthetic), so it samples the paper's pairs too: each prompt's baseline is then its
        # 2 trajectories, a weak one; a GRPO protocol for this preset is still to be chosen.
        # NFT in pairs: 32 groups, as SDPO's, which every reward's minibatch and
        # accumulation divide. AWM in pairs too; its own accumulation of 3 (x its 6 trained
        # timesteps) would not divide an epoch's 192 loss calls for a reward outside the
        # paper's, so 4 there (8 updates per epoch; the paper's rewards set theirs). MixGRPO
        # in pairs too: its published 12 divides neither the 64 trajectories nor the sampling
        # calls of 8.
        algo_overrides={"grpo": {"group_size": 2}, "nft": dict(NFT_GPU_GROUP),
                        "awm": {**NFT_GPU_GROUP, "gradient_accumulation_steps": 4}, "mixgrpo": {"group_size": 2}},
        reward_overrides={
            reward: {algo: {"learning_rate": lr, "train_batch_size": batch, "gradient_accumulation_steps": accumulation}
                     for algo in ALGORITHMS}
            for reward, (lr, batch, accumulation, _) in SD_TURBO_REWARD_SETTINGS.items()
        },
        reward_epochs={reward: epochs for reward, (*_, epochs) in SD_TURBO_REWARD_SETTINGS.items()},
    )


# (learning_rate, train_batch_size, gradient_accumulation_steps, epochs) per reward: the
# SDPO paper's configs (cited in `zoo.sdpo.PAPER_REWARD_SETTINGS`), with HPS v2.1 on its
# HPSv2 settings. `sd_turbo` gives the first three to every algorithm, the last is its budget.
SD_TURBO_REWARD_SETTINGS = {**PAPER_REWARD_SETTINGS, "hpsv2.1": PAPER_REWARD_SETTINGS["hpsv2"]}


def lcm() -> Preset:
    """RLCM's aesthetic task (Owen-Oertell/rlcm at b8330ed, `lcm_rl_pytorch/conf/config.yaml`
    and `conf/task/aesthetic.yaml`): LCM_Dreamshaper_v7, LCM sampling with 8 steps on RLCM's
    timestep rule, guidance embedding 8, LoRA r8/alpha 8, lr 1e-4, Adam."""
    # Every algorithm: RLCM's LoRA (aesthetic.yaml:22 r, :21 alpha) and learning rate (:7),
    # shared so that every adapter has the same capacity; Adam without weight decay
    # (core/rebel_training_loop.py:27, core/ppo_training_loop.py:26).
    shared = {"lora_rank": 8, "lora_alpha": 8.0, "learning_rate": 1e-4, "weight_decay": 0.0}
    # Minibatch 2 (aesthetic.yaml:9), accumulation 4 (:14; times K for PPO only,
    # scripts/main.py:43-48, which is how DDPOConfig and REBELConfig count it), stat tracker
    # buffer 32 / min count 16 (:18, :19).
    rlcm_loops = {"train_batch_size": 2, "gradient_accumulation_steps": 4,
                  "tracker_buffer_size": 32, "tracker_min_count": 16}
    return _published(
        name="lcm",
        model="SimianLuo/LCM_Dreamshaper_v7",  # rlcm conf/task/aesthetic.yaml:6
        model_revision=UNPINNED,  # to be pinned to a commit hash (zoo.hub.UNPINNED)
        sampler="lcm",  # rlcm scripts/main.py:65 (its patched LCMScheduler)
        # RLCM's patched LCMScheduler (diffusers_patch/lcm_scheduler.py:377-382) with 50
        # original inference steps (its default, lcm_scheduler.py:205; conf/config.yaml:12
        # passes lcm_origin_steps 50, which the patched pipeline's **kwargs swallows,
        # diffusers_patch/pipeline.py:542; stepzoo reads it from the model's scheduler
        # config, 50 for LCM_Dreamshaper_v7): K = 8
        # runs t = 999, 879, 759, 639, 519, 399, 279, 159. diffusers' LCMScheduler (None
        # here; 0.42.1) would run ..., 639, 499, 379, 259, 139.
        timestep_spacing="skipping",
        num_steps=8,  # rlcm conf/task/aesthetic.yaml:16
        guidance_scale=8.0,  # rlcm conf/config.yaml:13 (embedded as w - 1: core/rebel_training_loop.py:252-257)
        eta=1.0,  # unused by LCM sampling
        # RLCM's epoch is 10 rounds (aesthetic.yaml:17) of sampling 8 prompts (:8, :10) and
        # training on them at once: one optimizer update per round for REBEL (8 pairs,
        # core/rebel_training_loop.py:45-84) and PPO (8 trajectories, ppo_training_loop.py:39-58).
        # A stepzoo epoch is one such round, so that every update trains on fresh samples
        # and the stat tracker sees each round, as in RLCM: 100 RLCM epochs (:15) = 1000
        # here, of 16 trajectories (REBEL's 8 pairs; DDPO gets 16 trajectories, 2 updates,
        # RLCM PPO's 8 trajectories per update). The same 16000 trajectories as 100 epochs
        # of 160 would instead train 10 updates on each batch before sampling again.
        epochs=1000,
        trajectories_per_epoch=16 * RLCM_GPUS,
        paper_gpus=RLCM_GPUS,
        eval_every=100,  # every 10 RLCM epochs, its checkpoint interval (conf/config.yaml:14)
        mixed_precision="fp16",  # rlcm scripts/main.py:49
        algo_overrides={
            # REBEL: RLCM's loop has no gradient clipping (rebel_training_loop.py:334-336).
            "rebel": {**shared, **rlcm_loops, "max_grad_norm": None},
            # DDPO is RLCM's PPO: clip range 1e-4 (aesthetic.yaml:11), gradient norm 5 (:12,
            # used at ppo_training_loop.py:253-255), advantages clipped at 10 (:13).
            "ddpo": {**shared, **rlcm_loops, "clip_range": 1e-4, "max_grad_norm": 5.0, "adv_clip_max": 10.0},
            # RLCM runs neither: its LoRA, lr and optimizer, and their own references'
            # minibatches, accumulation and gradient clipping (1.0).
            "sdpo": dict(shared),
            "d3po": dict(shared),
            # GRPO: 16 trajectories are 2 groups of its 8; flow_grpo steps the optimizer
            # twice per epoch (config/grpo.py:236-240 at ac4c86e), so one group per update.
            "grpo": {**shared, "gradient_accumulation_steps": 1},
            # MixGRPO: GRPO's group of 8 (its published 12 divides neither 16 nor the calls of
            # 8), one update per group.
            "mixgrpo": {**shared, "group_size": 8},
            # DRaFT: AlignProp's minibatch of 8, accumulated over the round's two (AlignProp's 4
            # would not fit 16 trajectories): one update per round, as RLCM's REBEL.
            "draft": {**shared, "gradient_accumulation_steps": 2},
            # NFT likewise, in pairs: 8 minibatches of one pair, accumulated into one update per
            # epoch, as its reference takes one (config/nft.py:39-45).
            "nft": {**shared, **NFT_GPU_GROUP, "gradient_accumulation_steps": 8},
            # AWM too (its reference's one update per epoch, AWMConfig's docstring).
            "awm": {**shared, **NFT_GPU_GROUP, "gradient_accumulation_steps": 8},
        },
    )


def sd15() -> Preset:
    """DDPO's aesthetic task (kvablack/ddpo-pytorch at 1958463, `config/dgx.py:aesthetic` on
    `config/base.py`): Stable Diffusion 1.5, DDIM eta 1, K = 50, CFG 5, fp16, LoRA r4,
    lr 3e-4. Its minibatch, accumulation and stat tracker are DDPO's own (`algo_overrides`);
    the other algorithms keep their published defaults."""
    return _published(
        name="sd15",
        # ddpo-pytorch config/base.py:38 (runwayml/stable-diffusion-v1-5, now at this id).
        # The paper's aesthetic run used CompVis/stable-diffusion-v1-4 (config/dgx.py:11,
        # which aesthetic inherits, :48); the preset keeps the base config's 1.5.
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        model_revision=UNPINNED,  # to be pinned to a commit hash (zoo.hub.UNPINNED)
        sampler="ddim",  # ddpo-pytorch scripts/train.py:110
        # Deviation: DDPO keeps SD 1.5's scheduler config (scripts/train.py:110), whose
        # "leading" spacing with steps_offset 1 trains at t = 981, 961, ..., 1; here t = 999,
        # 979, ..., 19, the same K = 50 grid 18 steps higher, so that training and the 1- and
        # 2-step evaluation share one rule that starts at the top (leading starts them at
        # t = 1 and 501, samples of pure noise).
        timestep_spacing="trailing",
        num_steps=50,  # ddpo-pytorch config/base.py:45
        guidance_scale=5.0,  # ddpo-pytorch config/base.py:50
        eta=1.0,  # ddpo-pytorch config/base.py:48
        epochs=200,  # ddpo-pytorch config/dgx.py:49
        trajectories_per_epoch=32 * DDPO_GPUS,  # ddpo-pytorch config/dgx.py:19-20: 8 x 4 batches per GPU
        paper_gpus=DDPO_GPUS,
        eval_every=10,  # stepzoo's (the reference checkpoints every epoch, config/dgx.py:15)
        mixed_precision="fp16",  # ddpo-pytorch config/base.py:22
        algo_overrides={
            # Minibatch 4 (dgx.py:23) and accumulation 4 (:53): 2 updates per epoch; stat
            # tracker buffer 32 / min count 16 (:56-59). DDPOConfig's defaults hold the rest:
            # lr 3e-4 (base.py:64), weight decay 1e-4 (:70), grad norm 1.0 (:77), clip range
            # 1e-4 (:87), advantage clip 5 (:85), LoRA rank 4 (scripts/train.py:146, diffusers'
            # LoRAAttnProcessor default).
            "ddpo": {"train_batch_size": 4, "gradient_accumulation_steps": 4,
                     "tracker_buffer_size": 32, "tracker_min_count": 16},
            # NFT in pairs: 16 minibatches of one pair, NFTConfig's 16 accumulated, one update
            # per epoch as in its reference.
            "nft": dict(NFT_GPU_GROUP),
            # AWM likewise: 16 pairs accumulated into its reference's one update per epoch.
            "awm": {**NFT_GPU_GROUP, "gradient_accumulation_steps": 16},
            # MixGRPO: groups of 8 (its published 12 divides neither 32 nor the calls of 8).
            "mixgrpo": {"group_size": 8},
        },
    )


PRESETS: dict[str, Callable[[], Preset]] = {
    "tiny": tiny, "tiny-flow": tiny_flow, "tiny-turbo": tiny_turbo, "tiny-flow-turbo": tiny_flow_turbo,
    "sd-turbo": sd_turbo, "lcm": lcm, "sd15": sd15,
}


DEFAULT_PRESET = "tiny-turbo"
"""The preset of `benchmarks.run` and `benchmarks.tune` without --preset (`make bench`): the
tiny world's few-step UNet, the SDPO paper's setting (a distilled model sampled in 1 to 8
steps without guidance) in miniature."""


FLOW_GROUP = 16
"""GRPO's and NFT's group on the flow presets: flow_grpo's num_image_per_prompt in its
4-GPU PickScore configuration (yifan123/flow_grpo ac4c86e, config/grpo.py:197), 4 groups
in an epoch of 64 trajectories per GPU (16 in the run's 256)."""


def _flow_loops(window: int) -> dict[str, dict]:
    """Every algorithm's minibatch and accumulation on a flow preset: Flow-GRPO's update of
    32 trajectories (config/grpo.py:pickscore_sd3_4gpu: a minibatch of 8 trajectories, :202,
    accumulated 4 times, :203), two updates per epoch of 64. SDPO, which steps the optimizer
    per denoising step (its reference's loop), makes an update of 4 minibatches at each of
    the K steps instead. GRPO trains each trajectory's first `window` steps (flow_grpo's
    timestep_fraction 0.99, :205, which train_sd3.py:345 turns into int(0.99 K) steps: the
    last step, whose SDE std vanishes there, left out)."""
    update = {"gradient_accumulation_steps": 4}
    return {
        "ddpo": {"train_batch_size": 8, **update},
        # Pair methods: 4 pairs = 8 trajectories a minibatch.
        "rebel": {"train_batch_size": 4, **update},
        "d3po": {"train_batch_size": 4, **update},
        "sdpo": {"train_batch_size": 4, **update},
        "draft": {"train_batch_size": 8, **update},
        # GRPO as flow_grpo runs it: a group of 16 a minibatch, 2 accumulated (32
        # trajectories), β 0.01 (:206) on flow_grpo's KL form (train_sd3.py:895; the exact
        # Gaussian KL would weigh it σ - σ' times more, 13 times on average at K = 10), the
        # batch's std (:207).
        "grpo": {"group_size": FLOW_GROUP, "train_batch_size": 1, "gradient_accumulation_steps": 2,
                 "beta": 0.01, "kl_form": "flow-grpo", "global_std": True, "window_size": window,
                 "window_range": (0, window)},
        # NFT on the same groups, the epoch's 4 accumulated into one update, as DiffusionNFT's
        # SD3.5 configuration takes one per epoch (NFTConfig's docstring: NVlabs/DiffusionNFT
        # config/nft.py:39-45).
        "nft": {"group_size": FLOW_GROUP, "train_batch_size": 1, "gradient_accumulation_steps": 4},
        # AWM likewise, one update per epoch as its reference (AWMConfig's docstring, 9).
        "awm": {"group_size": FLOW_GROUP, "train_batch_size": 1, "gradient_accumulation_steps": 4},
        # MixGRPO on GRPO's groups of 16 (its published 12 divides neither 64 nor the calls of
        # 16), 2 accumulated: two updates an epoch, each of its window's steps.
        "mixgrpo": {"group_size": FLOW_GROUP, "train_batch_size": 1, "gradient_accumulation_steps": 2},
    }


def _flow_shared() -> dict:
    """What every algorithm of a flow preset shares, Flow-GRPO's: LoRA rank 32, alpha 64 on
    the joint attention's projections (scripts/train_sd3.py:419-431 at ac4c86e), AdamW at
    lr 3e-4 (config/base.py:63), weight decay 1e-4 (:69), so that every adapter and optimizer
    is the same (as the lcm preset shares RLCM's)."""
    from zoo.flow_policy import FLOW_LORA_TARGETS

    return {"lora_rank": 32, "lora_alpha": 64.0, "lora_target_modules": FLOW_LORA_TARGETS,
            "learning_rate": 3e-4, "weight_decay": 1e-4}


def sd35_medium() -> Preset:
    """Flow-GRPO's PickScore setting (yifan123/flow_grpo at ac4c86e, `config/grpo.py:
    pickscore_sd3_4gpu` on `config/base.py`, `scripts/train_sd3.py`): SD3.5 Medium at 512px,
    the SDE at noise level 0.7, K = 10, CFG 4.5, LoRA r32/alpha 64, groups of 16, two updates
    of 32 trajectories per GPU per epoch of 64 per GPU (`_flow_loops`), on its 4 GPUs
    (`paper_gpus`). The 4-GPU configuration:
    its groups of 16 live on one process, as stepzoo's do (the 32-GPU one's groups of 24
    span GPUs, :106-141). Deviations: the published animal prompts, not flow_grpo's PickScore prompt set
    (every GPU preset trains on them); the T5 prompt length is FlowPolicy's 256, flow_grpo
    encodes 128 (train_sd3.py:625); evaluation at `--eval-steps`, flow_grpo's at 40
    (grpo.py:192); no EMA of the adapter (grpo.py:208; see zoo/grpo.py)."""
    shared = _flow_shared()
    return _published(
        name="sd3.5-medium",
        model="stabilityai/stable-diffusion-3.5-medium",  # flow_grpo config/grpo.py:190
        model_revision=UNPINNED,  # to be pinned to a commit hash (zoo.hub.UNPINNED)
        reward="pickscore",  # flow_grpo config/grpo.py:212-214
        sampler="flow",  # flow_grpo diffusers_patch/sd3_sde_with_logprob.py (zoo.sampling's flow kind)
        timestep_spacing=None,  # the model's FlowMatchEulerDiscreteScheduler (shift 3) places the sigmas
        resolution=512,  # flow_grpo config/grpo.py:195
        num_steps=10,  # flow_grpo config/grpo.py:191
        guidance_scale=4.5,  # flow_grpo config/grpo.py:193
        eta=0.7,  # flow_grpo config/base.py:54 (noise_level)
        # flow_grpo sets no epoch count (it trains until stopped, grpo.py:56); stepzoo's.
        epochs=100,
        # 8 trajectories per sampling call (grpo.py:196) x 8 calls (:198): 64 per GPU.
        trajectories_per_epoch=64 * FLOW_GRPO_GPUS,
        paper_gpus=FLOW_GRPO_GPUS,
        # stepzoo's: a sampling call holds whole groups, one of 16 (flow_grpo's sampler spreads
        # a group over its calls of 8, train_sd3.py:78-120).
        sample_batch_size=FLOW_GROUP,
        eval_every=10,  # stepzoo's (flow_grpo evaluates every 60 epochs, grpo.py:210)
        mixed_precision="fp16",  # flow_grpo config/base.py:21
        algo_overrides={algo: {**shared, **loop} for algo, loop in _flow_loops(9).items()},
    )


def flux_schnell() -> Preset:
    """FLUX.1-schnell (black-forest-labs, Apache-2.0, which allows fine-tuning), few-step
    flow matching: 4 sampling steps (its reference's default, black-forest-labs/flux
    802fb47 src/flux/cli.py:165), no classifier-free guidance (timestep-distilled and
    without a guidance input, src/flux/util.py:378). No published RL recipe trains it, so the
    rest is stepzoo's: Flow-GRPO's SDE, noise level and loops (`sd35_medium`'s) at 512px."""
    shared = _flow_shared()
    return _published(
        name="flux-schnell",
        model="black-forest-labs/FLUX.1-schnell",  # flux src/flux/util.py:362
        model_revision=UNPINNED,  # to be pinned to a commit hash (zoo.hub.UNPINNED)
        sampler="flow",
        timestep_spacing=None,  # the model's scheduler: unshifted sigmas (flux cli.py:255)
        # stepzoo's: Flow-GRPO's resolution (config/grpo.py:195), where FLUX's default is 1024.
        resolution=512,
        num_steps=4,  # flux src/flux/cli.py:165
        guidance_scale=1.0,  # no CFG: diffusers' FLUX docs, "guidance_scale needs to be 0" for schnell
        eta=0.7,  # Flow-GRPO's noise level (flow_grpo config/base.py:54)
        epochs=100,  # stepzoo's, as sd3.5-medium
        trajectories_per_epoch=64 * FLOW_GRPO_GPUS,  # stepzoo's: Flow-GRPO's 64 per GPU on its 4 GPUs
        paper_gpus=FLOW_GRPO_GPUS,
        sample_batch_size=FLOW_GROUP,  # stepzoo's, as sd3.5-medium
        eval_every=10,  # stepzoo's
        # flux src/flux/util.py:691, :695 load its text encoders in bfloat16 (and diffusers' FLUX
        # docs the whole pipeline).
        mixed_precision="bf16",
        # Flow-GRPO's loops; GRPO trains int(0.99 x 4) = 3 of the 4 steps, flow_grpo's rule.
        algo_overrides={algo: {**shared, **loop} for algo, loop in _flow_loops(3).items()},
    )


PRESETS["sd3.5-medium"] = sd35_medium
PRESETS["flux-schnell"] = flux_schnell
