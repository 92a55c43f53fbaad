"""The test matrix over `zoo.registry.ALGORITHMS`: every registered algorithm, the same checks.

Log-probs come from a small module, logp = f_θ(features), standing in for UNet + scheduler
step, so the checks see real gradients without a diffusion model; forward-process losses
(`ForwardProcessAlgorithm`) get their ε-predictions from such a module, ε̂ = f_θ(features).
Batches go through the same calls the runner makes: `reward_steps` -> `shape_rewards` ->
`advantages` -> `loss`. Reward back-propagation algorithms (DRaFT) take rewards carrying the
graph instead: the same module stands in for sampler, decoder and reward.
"""

import ast
import dataclasses
import inspect
import json

import pytest
import torch
import tyro

from zoo.algorithm import (
    Algorithm, ForwardLossInputs, ForwardProcessAlgorithm, LossInputs, ReplayAlgorithm, RewardBackpropAlgorithm,
)
from zoo.registry import ALGORITHMS
from zoo.trajectory import Trajectory

SHARED_FIELDS = (
    "learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm",
    "train_batch_size", "gradient_accumulation_steps", "num_inner_epochs",
    "lora_rank", "lora_alpha", "lora_target_modules", "sampler", "num_steps", "guidance_scale", "eta", "flow_sde",
)
"""Fields the runner reads from every config (with `build`, `loss_calls_per_update` and
`steps_in_outer_loop`)."""

ADVANTAGE_ALGORITHMS = [name for name, config in ALGORITHMS.items() if isinstance(config().build(), Algorithm)]
"""The algorithms whose loss takes advantages with log-probs or, for forward-process losses,
noise predictions (`zoo.algorithm.Algorithm`)."""
REWARD_BACKPROP_ALGORITHMS = [
    name for name, config in ALGORITHMS.items() if isinstance(config().build(), RewardBackpropAlgorithm)
]
"""The algorithms whose loss takes rewards carrying the graph (`RewardBackpropAlgorithm`)."""

ZERO_ADVANTAGE_GRADIENT_OFF_POLICY = {
    "ddpo": True,  # -A·ratio is 0 for A = 0, whatever the ratio.
    "d3po": True,  # zero "advantages" are all-tie preferences, masked out.
    "rebel": False,  # regresses Δ/η onto ΔA = 0: pulls the log-ratio difference back to 0.
    "sdpo": False,  # the same regression, per step.
    "grpo": False,  # -A·ratio is 0, but β·KL pulls the moved log-probs back toward the base.
    "nft": False,  # p = 1/2 weighs ε⁺ and ε⁻ alike: pulls ε_θ back to ε_old.
    "awm": False,  # -A·ratio is 0 for A = 0, but the KL terms pull v̂_θ back toward the base and the EMA.
    "mixgrpo": True,  # -A·ratio is 0 for A = 0; its kl_coeff is 0 by default.
}
"""Whether zero advantages give a zero gradient when the log-probs have moved from the
sampling ones (every algorithm gives zero at the sampling weights; see the tests)."""

NUM_PROMPTS = 3
STEPS_PER_CALL = 2  # a chunk of steps, for algorithms whose loss is per step


class LogProbModel(torch.nn.Module):
    """logp = f_θ(features): per-transition log-probs from fixed features."""

    def __init__(self, num_features: int = 8):
        super().__init__()
        self.linear = torch.nn.Linear(num_features, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return -1.0 + 0.01 * self.linear(features).squeeze(-1)


class PredictionModel(torch.nn.Module):
    """ε̂ = f_θ(features): per-element noise predictions from fixed features."""

    def __init__(self, num_features: int = 8):
        super().__init__()
        self.linear = torch.nn.Linear(num_features, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features).squeeze(-1)


def sampled_trajectory(algo: Algorithm, generator: torch.Generator) -> Trajectory:
    needs, num_steps = algo.needs, algo.config.num_steps
    shape = (NUM_PROMPTS, needs.group_size, num_steps)
    latents = torch.randn(*shape, 4, 2, 2, generator=generator)
    return Trajectory(
        prompts=[f"prompt {i}" for i in range(NUM_PROMPTS)],
        prompt_embeds=torch.zeros(NUM_PROMPTS, 1, 1),
        timesteps=torch.arange(num_steps).flip(0).expand(shape),
        latents=latents,
        next_latents=latents,
        log_probs=torch.full(shape, -1.0),
        images=torch.rand(NUM_PROMPTS, needs.group_size, 3, 4, 4, generator=generator),
        pred_x0=torch.randn(*shape, 4, 2, 2, generator=generator) if needs.record_pred_x0 else None,
    )


def global_advantages(algo: Algorithm, tracker, generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
    traj = sampled_trajectory(algo, generator)
    steps = algo.reward_steps(traj)
    score_shape = traj.log_probs.shape[:2] if steps is None else steps.shape
    returns = algo.shape_rewards(traj, torch.rand(score_shape, generator=generator))
    return traj.prompts, algo.advantages(traj.prompts, returns, tracker)


def loss_inputs(name: str, *, on_policy: bool, zero_advantages: bool, seed: int = 0):
    """One `loss` call's inputs and the module whose parameters should receive gradients."""
    generator = torch.Generator().manual_seed(seed)
    algo = ALGORITHMS[name]().build()
    _, advantages = global_advantages(algo, algo.new_tracker(), generator)  # (P, G, K)
    if isinstance(algo, ForwardProcessAlgorithm):
        return forward_loss_inputs(algo, advantages, on_policy, zero_advantages, generator)
    num_steps = advantages.shape[2]
    steps_per_call = num_steps if algo.needs.whole_trajectory_loss else STEPS_PER_CALL
    step_index = torch.randperm(num_steps, generator=generator)[:steps_per_call]
    step_index = step_index.expand(NUM_PROMPTS, algo.needs.group_size, steps_per_call)  # same order in a group
    model = LogProbModel()
    features = torch.randn(*step_index.shape, 8, generator=generator)
    log_probs = model(features)
    nudge = 0.01 * torch.randn(step_index.shape, generator=generator)
    old_log_probs = log_probs.detach() if on_policy else log_probs.detach() + nudge
    inputs = LossInputs(
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=torch.zeros_like(log_probs) if zero_advantages else torch.gather(advantages, 2, step_index),
        step_index=step_index,
        ref_log_probs=log_probs.detach() - nudge if algo.needs.reference_log_probs else None,
        # A stand-in KL to the base model, taken to be the sampling policy (the first epoch's,
        # whose adapter is still zero): 0 with a zero gradient at the sampling weights.
        kl_to_reference=0.5 * (log_probs - old_log_probs) ** 2 if algo.needs.kl_to_reference else None,
    )
    return algo, inputs, model


def forward_loss_inputs(algo: Algorithm, advantages: torch.Tensor, on_policy: bool, zero_advantages: bool,
                        generator: torch.Generator):
    """A forward-process `loss` call's inputs: one timestep per trajectory, latents of
    4 x 2 x 2; "zero advantages" are the value `advantages` gives a reward at its prompt's
    mean (NFT's optimality 1/2). On policy is the first minibatch of a run, where the fresh
    adapter (lora_B = 0) makes the current, old and base predictions one."""
    num_prompts, group_size, num_steps = advantages.shape
    model = PredictionModel()
    features = torch.randn(num_prompts, group_size, 4, 2, 2, 8, generator=generator)
    prediction = model(features)
    nudge = 0.1 * torch.randn(prediction.shape, generator=generator)
    step = torch.randint(num_steps, (num_prompts, group_size, 1), generator=generator)
    neutral = algo.advantages(["one prompt"], torch.zeros(1, 1), algo.new_tracker())[0, 0, 0]
    inputs = ForwardLossInputs(
        prediction=prediction,
        old_prediction=prediction.detach() if on_policy else prediction.detach() + nudge,
        target=torch.randn(prediction.shape, generator=generator),
        x0_scale=0.3 + 2 * torch.rand(num_prompts, group_size, generator=generator),
        advantages=neutral.expand(num_prompts, group_size) if zero_advantages else advantages.gather(2, step)[..., 0],
        ref_prediction=(prediction.detach() if on_policy else prediction.detach() - nudge)
        if algo.needs.reference_prediction else None,
    )
    return algo, inputs, model


def gradient_norm(model: torch.nn.Module) -> torch.Tensor:
    return torch.stack([p.grad.norm() for p in model.parameters()]).norm()


def test_registry_names_configs_that_build_algorithms():
    for name, config_class in ALGORITHMS.items():
        assert name == name.lower() and dataclasses.is_dataclass(config_class)
        config = config_class()
        assert isinstance(config.build(), (Algorithm, RewardBackpropAlgorithm))
        assert isinstance(config.loss_calls_per_update, int) and config.loss_calls_per_update >= 1
        assert isinstance(config.steps_in_outer_loop, bool)
        missing = [f for f in SHARED_FIELDS if f not in {field.name for field in dataclasses.fields(config)}]
        assert not missing, f"{name} lacks the shared fields {missing}"


def field_docstrings(config_class: type) -> dict[str, str | None]:
    """Field name -> the string under the field where it was last declared (None if there is
    none): a config re-declares a shared field of its base to change its default."""
    docstrings = {}
    for cls in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for node, following in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign):
                documented = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                docstrings[node.target.id] = following.value.value if documented else None
    return docstrings


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_field_has_a_docstring_in_help(name, monkeypatch, capsys):
    """tyro turns the string under each field into --help, inherited fields included; a field
    without one is undocumented."""
    config_class = ALGORITHMS[name]
    docstrings = field_docstrings(config_class)
    assert not [field for field, doc in docstrings.items() if doc is None]
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag, so each docstring appears whole
    with pytest.raises(SystemExit):
        tyro.cli(config_class, args=["--help"])
    help_text = capsys.readouterr().out
    assert not [field for field in docstrings if docstrings[field] not in help_text]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_tyro_parses_defaults_and_flags(name):
    config_class = ALGORITHMS[name]
    assert tyro.cli(config_class, args=[]) == config_class()
    parsed = tyro.cli(config_class, args=["--learning-rate", "0.5", "--max-grad-norm", "None"])
    assert parsed.learning_rate == 0.5 and parsed.max_grad_norm is None


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", -1.0), ("train_batch_size", 0), ("max_grad_norm", 0.0), ("lora_rank", 0), ("num_steps", 0)],
)
def test_impossible_values_are_refused_naming_the_field(name, field, value):
    with pytest.raises(ValueError, match=field):
        ALGORITHMS[name](**{field: value})


def test_every_algorithm_is_of_one_kind():
    assert sorted(ADVANTAGE_ALGORITHMS + REWARD_BACKPROP_ALGORITHMS) == sorted(ALGORITHMS)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_only_losses_that_read_log_probs_refuse_deterministic_ddim(name):
    """eta = 0 has no log-density: refused by the configs whose loss reads log-probs, taken
    by forward-process losses and reward back-propagation (which read none); a negative eta
    by every config."""
    config = ALGORITHMS[name]()
    algo = config.build()
    reads = isinstance(algo, ReplayAlgorithm)
    assert config.reads_log_probs == reads
    if reads:
        with pytest.raises(ValueError, match="eta"):
            ALGORITHMS[name](sampler="ddim", eta=0.0)
    else:
        assert ALGORITHMS[name](sampler="ddim", eta=0.0).eta == 0.0
    with pytest.raises(ValueError, match="eta must be non-negative"):
        ALGORITHMS[name](sampler="ddim", eta=-0.5)


@pytest.mark.parametrize("name", REWARD_BACKPROP_ALGORITHMS)
def test_reward_backprop_loss_is_a_finite_scalar_whose_gradient_reaches_the_parameters(name):
    """Rewards from the stand-in module (for sampler, decoder and reward): a finite scalar
    loss with detached scalar metrics, a nonzero gradient on every parameter, no tracker
    state, and a K between 1 and the sampler's steps."""
    algo = ALGORITHMS[name](num_steps=4).build()
    model = LogProbModel()
    rewards = model(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)))
    loss, metrics = algo.loss(rewards)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad and "loss" in metrics
    for key, value in metrics.items():
        assert value.dim() == 0 and torch.isfinite(value) and not value.requires_grad, key
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert gradient_norm(model) > 1e-6
    assert algo.new_tracker().state_dict() == {}
    assert 1 <= algo.grad_steps(torch.Generator().manual_seed(0)) <= 4


@pytest.mark.parametrize("name", ADVANTAGE_ALGORITHMS)
def test_loss_is_a_finite_scalar_with_detached_scalar_metrics(name):
    algo, inputs, _ = loss_inputs(name, on_policy=False, zero_advantages=False)
    loss, metrics = algo.loss(inputs)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    assert "loss" in metrics
    for key, value in metrics.items():
        assert value.dim() == 0 and torch.isfinite(value) and not value.requires_grad, key


@pytest.mark.parametrize("name", ADVANTAGE_ALGORITHMS)
def test_gradients_reach_trainable_parameters(name):
    """At the sampling weights (old = current log-probs, the first minibatch of an epoch)."""
    algo, inputs, model = loss_inputs(name, on_policy=True, zero_advantages=False)
    loss, _ = algo.loss(inputs)
    loss.backward()
    for parameter in model.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    assert gradient_norm(model) > 1e-6


@pytest.mark.parametrize("name", ADVANTAGE_ALGORITHMS)
def test_zero_advantages_give_zero_gradient_at_the_sampling_weights(name):
    """Log-ratios 0 and advantages 0: every loss is flat there (PPO: -0·ratio; the
    regressions: the residual w·0 - 0; D3PO: nothing decided)."""
    algo, inputs, model = loss_inputs(name, on_policy=True, zero_advantages=True)
    loss, _ = algo.loss(inputs)
    loss.backward()
    assert gradient_norm(model) == 0


def test_every_algorithm_states_its_off_policy_zero_advantage_gradient():
    assert set(ZERO_ADVANTAGE_GRADIENT_OFF_POLICY) == set(ADVANTAGE_ALGORITHMS)


@pytest.mark.parametrize("name", ADVANTAGE_ALGORITHMS)
def test_zero_advantages_off_policy(name):
    """With log-probs moved from the sampling ones, see ZERO_ADVANTAGE_GRADIENT_OFF_POLICY."""
    algo, inputs, model = loss_inputs(name, on_policy=False, zero_advantages=True)
    loss, _ = algo.loss(inputs)
    loss.backward()
    assert (gradient_norm(model) == 0) == ZERO_ADVANTAGE_GRADIENT_OFF_POLICY[name]


@pytest.mark.parametrize("name", ADVANTAGE_ALGORITHMS)
def test_tracker_state_round_trips_through_json(name):
    """A tracker restored from its JSON state gives the same advantages on the next batch."""
    algo = ALGORITHMS[name]().build()
    tracker = algo.new_tracker()
    global_advantages(algo, tracker, torch.Generator().manual_seed(0))
    restored = algo.new_tracker()
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.state_dict() == tracker.state_dict()
    _, expected = global_advantages(algo, tracker, torch.Generator().manual_seed(1))
    _, actual = global_advantages(algo, restored, torch.Generator().manual_seed(1))
    torch.testing.assert_close(actual, expected)
