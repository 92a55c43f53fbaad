"""The few-step students (zoo/tiny/turbo.py, build stage 7): the teachers' solvers on models
whose ODE is known, the levels the students are trained at, the losses on worked numbers,
the build stage's determinism, and the shipped folders in plain diffusers and in both
presets end to end."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

from benchmarks.presets import PRESETS
from benchmarks.run import main
from zoo.tiny import CLIP, PIPELINE, PIPELINE_FLOW, PIPELINE_FLOW_TURBO, PIPELINE_TURBO, TURBO_GUIDANCE, data, turbo
from zoo.tiny.arch import make_ddim_scheduler
from zoo.tiny.build import SMOKE_OVERRIDES, BuildConfig, build
from zoo.tiny.flow import FLOW_SHIFT, T5_TOKENS

from helpers.runs import ALGOS, micro_args

ALPHAS = make_ddim_scheduler().alphas_cumprod


def _point_mass_eps(x0_star: torch.Tensor):
    """The exact ε̂ of a data distribution that is the single point x0*: (x - √ᾱ·x0*) / √(1-ᾱ)."""

    def predict(x, t, rows):
        alpha = ALPHAS[t].view(-1, 1, 1, 1)
        return (x - alpha.sqrt() * x0_star.repeat(x.shape[0] // x0_star.shape[0], 1, 1, 1)) / (1 - alpha).sqrt()

    return predict


# ---------------------------------------------------------------- levels


def test_trailing_timesteps_are_ddims():
    for steps in (1, 2, 4, 8):
        scheduler = DDIMScheduler(timestep_spacing="trailing", num_train_timesteps=1000)
        scheduler.set_timesteps(steps)
        assert turbo.trailing_timesteps(steps).tolist() == scheduler.timesteps.tolist()
    # 8 steps hold the timesteps of 1, 2 and 4: training there covers every step count.
    assert turbo.trailing_timesteps(8).tolist() == [999, 874, 749, 624, 499, 374, 249, 124]


def test_flow_levels_are_the_schedulers_sigmas():
    """Shift 3 at 2, 4 and 8 steps: σ = 1 (every count's first call, trained apart), then
    these; the final step (σ = 0.003 to 0) is left out, where x̂0 is the input itself."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)
    levels = turbo.flow_sampler_sigmas(scheduler, (2, 4, 8))
    scheduler.set_timesteps(4)
    four = [round(s, 4) for s in scheduler.sigmas.tolist()]
    assert four[0] == 1.0 and four[1:3] == [s for s in levels if s in four[1:3]] and len(levels) == 8
    assert scheduler.sigmas.shape[0] == 5  # the copy was set, not the caller's scheduler
    assert torch.allclose(turbo.unshift_sigma(turbo.shift_sigma(torch.tensor([0.2, 0.7]), 3.0), 3.0), torch.tensor([0.2, 0.7]))


def test_teacher_steps_scale_with_the_path_left():
    assert [turbo.teacher_steps_for((t + 1) / 1000, 8) for t in turbo.trailing_timesteps(8).tolist()] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert turbo.teacher_steps_for(0.001, 8) == 1


def test_endpoint_plan_weights_the_top_level():
    assert turbo.endpoint_plan([999, 499], 999, 10, 3) == [(999, 30), (499, 10)]


# ---------------------------------------------------------------- teachers


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_unet_solver_returns_the_point_mass(steps):
    """DDIM at eta 0 is exact for a point-mass data distribution: from any x_t and any step
    count it lands on x0*, with or without guidance (both branches agree here)."""
    x0_star = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    x_t = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    solved = turbo.unet_teacher_solve(_point_mass_eps(x0_star), x_t, 999, torch.tensor([0, 1]), 2, ALPHAS, 4.0, steps)
    torch.testing.assert_close(solved, x0_star, rtol=0, atol=1e-4)


def test_guidance_combines_the_branches():
    """ε̂ = ε̂_uncond + w·(ε̂_cond - ε̂_uncond), the empty caption's row for the second branch."""
    def predict(x, level, rows):
        return x * 0 + rows.view(-1, 1).float()  # the row index as the prediction

    out = turbo.guided(predict, torch.zeros(2, 1), torch.zeros(2), torch.tensor([3, 5]), 9, 4.0)
    torch.testing.assert_close(out, torch.tensor([[9 + 4 * (3 - 9.0)], [9 + 4 * (5 - 9.0)]]))


def test_flow_solver_is_exact_on_straight_paths():
    """A constant velocity is a straight path: Euler lands on x - σ_start·v at any step count."""
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    for steps in (1, 5):
        out = turbo.flow_teacher_solve(lambda x_, s, r: v.repeat(2, 1, 1, 1), x, 0.8, torch.tensor([0, 1]), 2, 3.0, steps, 3.0)
        torch.testing.assert_close(out, x - 0.8 * v, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- losses


def test_unet_endpoint_loss_is_zero_at_the_exact_eps_and_worked_otherwise():
    """x̂0 = (x - √(1-ᾱ)ε̂)/√ᾱ; a student that answers ε̂ + δ is off by -δ·√(1-ᾱ)/√ᾱ in x̂0."""
    t = torch.tensor([499, 124])
    target = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    alpha = ALPHAS[t].view(-1, 1, 1, 1)
    start = alpha.sqrt() * target + (1 - alpha).sqrt() * torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    exact_eps = (start - alpha.sqrt() * target) / (1 - alpha).sqrt()
    pairs = turbo.Pairs(start, t.float(), torch.tensor([0, 1]), target)
    hidden = torch.zeros(2, 1, 1)

    class Student(torch.nn.Module):
        def __init__(self, offset):
            super().__init__()
            self.offset = offset

        def forward(self, x, t, h):
            return type("Out", (), {"sample": exact_eps + self.offset})

    loss = turbo.unet_endpoint_loss(ALPHAS, hidden)
    assert loss(Student(0.0), pairs, None).item() < 1e-10
    expected = ((1 - alpha) / alpha).mean().item() * 0.01  # δ = 0.1, averaged over the two timesteps' elements
    assert loss(Student(0.1), pairs, None).item() == pytest.approx(expected, rel=1e-5)


def test_flow_losses_on_worked_numbers():
    """Endpoint: x - σ·v̂ against the target. Reflow: v̂ against noise - endpoint on the path
    point (1-σ)·endpoint + σ·noise."""
    start, target = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 0.5)
    pairs = turbo.Pairs(start, torch.tensor([0.5]), torch.tensor([0]), target)
    endpoint = turbo.flow_endpoint_loss(lambda model, x, sigma, rows: torch.full_like(x, 1.0))
    assert endpoint(None, pairs, None).item() == pytest.approx((2.0 - 0.5 * 1.0 - 0.5) ** 2)
    seen = {}

    def predict(model, x, sigma, rows):
        seen.update(x=x.item(), sigma=sigma.item())
        return torch.full_like(x, 1.0)

    loss = turbo.reflow_loss(predict, 3.0)(None, pairs, torch.Generator().manual_seed(0))
    s = turbo.shift_sigma(torch.rand(1, generator=torch.Generator().manual_seed(0)), 3.0).item()
    assert seen["sigma"] == pytest.approx(s) and seen["x"] == pytest.approx((1 - s) * 0.5 + s * 2.0)
    assert loss.item() == pytest.approx((1.0 - (2.0 - 0.5)) ** 2)


def test_make_pairs_starts_from_noise_at_the_top_and_from_noised_renders_below():
    calls = []

    def solve(start, level, rows):
        calls.append((level, start.shape[0]))
        return start * 0 + level

    pairs = turbo.make_pairs(
        [(999, 3), (499, 2)], is_top=lambda level: level == 999,
        noised=lambda latents, noise, level: latents + 100.0, solve=solve,
        encode=lambda images, g: torch.zeros(images.shape[0], 1, 2, 2), batch=2,
        generator=torch.Generator().manual_seed(0), log=lambda line: None,
    )
    assert calls == [(999, 2), (999, 1), (499, 2)]
    assert pairs.level.tolist() == [999, 999, 999, 499, 499]
    assert (pairs.start[:3].abs() < 10).all() and (pairs.start[3:] == 100.0).all()  # noise, then noised latents
    assert pairs.target[:, 0, 0, 0].tolist() == pairs.level.tolist()
    assert pairs.caption.max() < len(data.train_captions())


def test_regress_fits_and_returns_the_ema():
    """Regressing a one-weight model onto a constant target moves its EMA towards it."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    pairs = turbo.Pairs(torch.ones(8, 1), torch.zeros(8), torch.zeros(8, dtype=torch.long), torch.full((8, 1), 0.5))
    ema = turbo.regress(model, pairs, lambda m, b, g: (m(b.start) - b.target).pow(2).mean(), steps=300, batch=4, lr=0.05,
                        ema_decay=0.9, generator=torch.Generator().manual_seed(0), stage="t", log=lambda *a: None)
    assert ema is not model and abs(ema.weight.item() - 0.5) < 0.02


# ---------------------------------------------------------------- build stage


@pytest.mark.parametrize("only, method", [("turbo", "endpoint"), ("turbo", "consistency"),
                                          ("flow-turbo", "endpoint"), ("flow-turbo", "reflow")])
def test_turbo_stage_runs_alone_and_is_deterministic(only, method, tmp_path):
    """`--only turbo|flow-turbo` (smoke sizes) on the shipped teachers: the same seed writes the
    same weights; the stage's method, time and command land in build_info.json; the folder
    links the teacher's shared parts instead of copying them."""
    out = tmp_path / "assets"
    out.mkdir()
    for name, folder in (("clip", CLIP), ("pipeline", PIPELINE), ("pipeline-flow", PIPELINE_FLOW)):
        (out / name).symlink_to(folder)
    overrides = {k: v for k, v in SMOKE_OVERRIDES.items() if k.startswith(("turbo", "flow_turbo"))}
    field = "turbo_method" if only == "turbo" else "flow_turbo_method"
    cfg = BuildConfig(out=out, seed=3, only=only, **overrides, **{field: method})
    folder, weights = ("pipeline-turbo", "unet") if only == "turbo" else ("pipeline-flow-turbo", "transformer")
    build(cfg)
    first = (out / folder / weights / "diffusion_pytorch_model.safetensors").read_bytes()
    build(cfg)
    assert (out / folder / weights / "diffusion_pytorch_model.safetensors").read_bytes() == first
    info = json.loads((out / "build_info.json").read_text())
    assert info["stage_records"][only]["method"] == method and info["stage_seconds"][only] > 0
    assert 0 < info["stage_records"][only]["cpu_seconds"]
    assert f"--only {only}" in info["stage_commands"][only]
    assert (f"--{field.replace('_', '-')} {method}" in info["stage_commands"][only]) == (method != getattr(BuildConfig, field))
    assert (out / folder / "vae").is_symlink() or (out / folder / "vae" / "diffusion_pytorch_model.safetensors").is_symlink()


def test_turbo_stage_needs_its_teacher(tmp_path):
    with pytest.raises(SystemExit, match="--only flow-turbo needs pipeline-flow/"):
        build(BuildConfig(out=tmp_path, only="flow-turbo"))


# ---------------------------------------------------------------- shipped students


def test_shipped_students_load_and_sample_in_plain_diffusers():
    """What a user types: the UNet student through StableDiffusionPipeline, the flow student
    through StableDiffusion3Pipeline with no T5 (the documented way to drop it), one step,
    no guidance."""
    unet = StableDiffusionPipeline.from_pretrained(PIPELINE_TURBO)
    images = unet(["a red circle on a white background"], num_inference_steps=1, guidance_scale=TURBO_GUIDANCE,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE) and torch.isfinite(images).all()
    flow = StableDiffusion3Pipeline.from_pretrained(PIPELINE_FLOW_TURBO, text_encoder_3=None, tokenizer_3=None)
    images = flow(["a red circle on a white background"], num_inference_steps=1, guidance_scale=TURBO_GUIDANCE,
                  output_type="pt", max_sequence_length=T5_TOKENS, height=data.IMAGE_SIZE, width=data.IMAGE_SIZE,
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE) and torch.isfinite(images).all()
    assert unet.scheduler.config.timestep_spacing == "trailing"
    # The students store their own network only; the rest is the teacher's, linked.
    weights = "diffusion_pytorch_model.safetensors"
    assert (PIPELINE_TURBO / "vae" / weights).resolve() == (PIPELINE / "vae" / weights).resolve()
    assert (PIPELINE_FLOW_TURBO / "vae" / weights).resolve() == (PIPELINE / "vae" / weights).resolve()


@pytest.mark.parametrize("preset", ["tiny-turbo", "tiny-flow-turbo"])
def test_turbo_presets_run_every_algorithm_end_to_end(preset, tmp_path):
    """Each preset's own shipped model, every algorithm, the micro budget; sampled without
    guidance in training (recorded) and evaluation."""
    out = tmp_path / "run"
    args = micro_args(PRESETS[preset]().model, out, preset) + ["--algos", ",".join([*ALGOS, "draft"]),
                                                               "--reward", "tiny-aesthetic"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {row["algo"] for row in rows} == {"base", *ALGOS, "draft"}
    config = json.loads((out / "config.json").read_text())
    assert all(c["guidance_scale"] == TURBO_GUIDANCE for c in config["algorithm_configs"].values())
