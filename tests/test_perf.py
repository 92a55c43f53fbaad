"""`python -m benchmarks.perf` runs on the tiny world and on a reduced real architecture and
writes its table; its epoch projection is checked on worked numbers and against the
trainer's own epoch. Speeds are measured by the command, never asserted here."""

import json
import sys
from dataclasses import fields, replace

import pytest
import torch
from accelerate import Accelerator

from benchmarks import archs, perf
from benchmarks.cli import preset_algo_configs
from benchmarks.perf import COLUMNS, PerfArgs, algorithm_config, epoch_loss_calls, main, project_epoch
from benchmarks.presets import PRESETS
from benchmarks.epochs import train_on_batch
from benchmarks.loop import TrainLoop
from zoo.algorithm import EpochContext
from zoo.loading import load_policy
from zoo.policy import LoraSettings
from zoo.registry import ALGORITHMS
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

FIGURES = ("sample_traj_s", "sample_speedup", "epoch_traj_s", "overlap_speedup", "train_transitions_s",
           "train_speedup", "reward_images_s", "sample_peak_gb", "train_peak_gb", "trained_state_gb", "train_tflops",
           "mfu", "ratio_drift",
           "epoch_s", "run_h", "flop_limit_s")
PAIR_BASELINES = ("sample_speedup", "train_speedup")
"""Timed only for groups of two: with one member the per-member way is the batched way."""
LOG_PROB_FIGURES = ("ratio_drift", "train_speedup")
"""Not measured for a forward-process loss (NFT), which re-scores no transition."""


def _check_outputs(record: dict, out, setting: str, algos: list[str], figures=FIGURES) -> None:
    """Every figure present and non-negative; the same trajectories score the same with
    rewards overlapped or not."""
    table = (out / f"{setting}.md").read_text()
    assert "| " + " | ".join(header for _, header in COLUMNS) + " |" in table
    assert json.loads((out / f"{setting}.json").read_text()) == json.loads(json.dumps(record))
    assert [row["algo"] for row in record["rows"]] == algos
    for row in record["rows"]:
        assert "error" not in row
        expected = [key for key in figures if (row["group"] > 1 or key not in PAIR_BASELINES)
                    and (row["algo"] != "nft" or key not in LOG_PROB_FIGURES)]
        assert all(row[key] >= 0 for key in expected), row
        assert row["overlap_score_diff"] == 0
        assert row.get("ratio_drift", 0) <= 1e-3  # float32 on the CPU: re-scoring is exact
        # The projection is the figures it is made of (a CPU's rewards are not overlapped).
        assert row["epoch_s"] == pytest.approx(row["epoch_sample_calls"] * row["sample_call_s"]
                                               + row["epoch_loss_calls"] * row["train_call_s"])
        assert row["run_h"] == pytest.approx(row["epoch_s"] * record["epochs"] / 3600)


def test_tiny_world_table(tmp_path, monkeypatch):
    loops = []

    def trainers_epoch(*args):  # the real one, recording the loop switches it was given
        loops.append(args[8])
        return train_on_batch(*args)

    monkeypatch.setattr(perf, "train_on_batch", trainers_epoch)
    args = PerfArgs(preset="tiny", algos="sdpo,ddpo,nft", batch_size=2, steps=1, repeats=1, device="cpu",
                    measure_epoch="sdpo", measured_trajectories=4, micro_batch=2, out=str(tmp_path))
    record = main(args)
    assert [(loop.micro_batch, loop.sample_batch_size) for loop in loops] == [(2, 2)]
    _check_outputs(record, tmp_path, "tiny-cpu", ["sdpo", "ddpo", "nft"])
    sdpo, ddpo, nft = record["rows"]
    assert (sdpo["group"], sdpo["batch"], sdpo["train_batch"], sdpo["steps"]) == (2, 2, 1, 1)
    assert (ddpo["group"], ddpo["train_batch"]) == (1, 2)  # the preset's 8 is clamped to the groups sampled
    assert "sample_speedup" in sdpo and "sample_speedup" not in ddpo
    assert "ratio_drift" not in nft and nft["train_transitions_s"] > 0
    # The tiny preset's epoch: 64 trajectories; SDPO's 32 pairs in 32 calls of one pair,
    # trained in 32 minibatches of one pair x 1 step; DDPO's 64 in 32 calls of two.
    assert (record["epoch_trajectories"], record["epochs"]) == (64, 10)
    assert (sdpo["epoch_sample_calls"], sdpo["epoch_loss_calls"]) == (32, 32)
    assert (ddpo["epoch_sample_calls"], ddpo["epoch_loss_calls"]) == (32, 32)
    # Measured for SDPO only: 4 trajectories (2 pairs) scaled to the epoch's 64.
    assert sdpo["measured_epoch_s"] == pytest.approx(sdpo["measured_s"] * 64 / 4)
    assert "measured_epoch_s" not in ddpo
    assert "epoch s (measured)" in (tmp_path / "tiny-cpu.md").read_text()


def test_projection_on_worked_numbers():
    """The SDPO paper's epoch at the H100 rates of results/perf/README.md: 64 trajectories
    in 8 calls of 8 (3.24 s each: 2.47 traj/s), 32 pairs in minibatches of 2 trained at
    each of K = 50 steps: 16 x 50 = 800 calls of 0.14 s (4 transitions at 28.6/s). So
    8 x 3.24 + 800 x 0.14 = 25.92 + 112 = 137.92 s, 3.83 h for 100 epochs. FLOP limit at
    750 TFLOP/s with 1.5 PFLOP per sampling call and 12 TFLOP per training call:
    (8 x 1.5e15 + 800 x 1.2e13) / 7.5e14 = 2.16e16 / 7.5e14 = 28.8 s."""
    sdpo = algorithm_config("sdpo", PRESETS["sd-turbo"](), PerfArgs(), 50)
    calls = epoch_loss_calls(sdpo, sdpo.build().needs, groups=32, train_groups=2)
    assert calls == 800
    seconds, limit = project_epoch(8, 3.24, 1.5e15, calls, 0.14, 1.2e13, 750.0)
    assert seconds == pytest.approx(137.92)
    assert seconds * 100 / 3600 == pytest.approx(3.831, abs=1e-3)
    assert limit == pytest.approx(28.8)
    # REBEL's loss spans the whole trajectory: one call per minibatch (its chunks of steps
    # are backward passes inside it), and a last minibatch of one pair still counts.
    rebel = algorithm_config("rebel", PRESETS["sd-turbo"](), PerfArgs(), 50)
    assert epoch_loss_calls(rebel, rebel.build().needs, groups=33, train_groups=2) == 17


@pytest.mark.parametrize("algo", ["sdpo", "ddpo", "rebel", "d3po", "grpo", "nft"])
def test_projected_loss_calls_are_the_trainers(tiny_pipeline_dir, algo):
    """`epoch_loss_calls` counts what `train_on_batch` does: 6 groups in minibatches of 4
    (a last one of 2), every trained step (GRPO's window), whole trajectories, inner epochs."""
    preset = PRESETS["tiny"]()
    config = algorithm_config(algo, preset, PerfArgs(train_batch_size=4), preset.num_steps)
    algorithm = config.build()
    needs = algorithm.needs
    torch.manual_seed(0)
    policy = load_policy(tiny_pipeline_dir, lora=LoraSettings())
    sampler = TrajectorySampler(policy, SamplerConfig(config.sampler, config.num_steps, config.eta))
    generator = torch.Generator().manual_seed(0)
    traj = sampler.sample(
        [f"prompt {i}" for i in range(6)], group_size=needs.group_size, shared_noise=needs.shared_noise,
        generator=generator, record_pred_x0=needs.record_pred_x0, reference_log_probs=needs.reference_log_probs,
    )
    advantages = torch.randn(traj.log_probs.shape, generator=generator)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=0.0)
    loop = TrainLoop(steps_per_backward=config.num_steps)  # one backward pass per loss call
    _, counts = train_on_batch(algorithm, config, sampler, traj, advantages, optimizer, Accelerator(cpu=True),
                             EpochContext(0, 1, generator), loop, False)
    assert counts["backward_passes"] == epoch_loss_calls(config, needs, groups=6, train_groups=4)
    assert counts["backward_passes"] > 0


@pytest.mark.parametrize("preset", ["tiny", "sd-turbo", "sd15", "lcm", "sd3.5-medium", "flux-schnell"])
def test_configs_are_the_runners(preset):
    """Each algorithm's config is the runner's for the preset's own reward (on sd-turbo
    the SDPO paper's minibatch and accumulation for every algorithm)."""
    chosen = PRESETS[preset]()
    runner = preset_algo_configs(chosen, chosen.reward)
    for name in ALGORITHMS:
        config = algorithm_config(name, chosen, PerfArgs(), chosen.num_steps)
        expected = getattr(runner, name)
        assert {f.name: getattr(config, f.name) for f in fields(config) if f.init} == {
            f.name: getattr(expected, f.name) for f in fields(expected) if f.init
        }, name
    if preset == "sd-turbo":
        ddpo = algorithm_config("ddpo", chosen, PerfArgs(), 50)
        # sdpo config/config_sdpo.py:23-24, the minibatch per GPU on the paper's 4 GPUs
        assert (ddpo.train_batch_size, ddpo.gradient_accumulation_steps) == (2 * 4, 8)


def test_overlap_with_a_random_weight_model_reward(tmp_path, monkeypatch):
    """× overlap with a model reward (the aesthetic predictor's format, random weights at
    the tiny checkpoints' size on the tiny preset), scored the same both ways; built
    without open_clip, which the GPU machine lacks."""
    monkeypatch.setitem(sys.modules, "open_clip", None)
    args = PerfArgs(preset="tiny", algos="sdpo", reward="aesthetic", random_reward_weights=True, batch_size=2,
                    steps=1, repeats=1, sample_calls=2, baseline=False, device="cpu", out=str(tmp_path))
    record = main(args)
    row = record["rows"][0]
    assert record["reward"] == "aesthetic (random weights)"
    assert row["overlap_score_diff"] == 0 and row["overlap_speedup"] > 0 and row["reward_images_s"] > 0


@pytest.mark.parametrize("flags, message", [
    (dict(random_reward_weights=True), "--random-reward-weights"),
    (dict(epoch_trajectories=7), "--epoch-trajectories 7"),
    (dict(measured_trajectories=3), "--measured-trajectories 3"),
    (dict(measure_epoch="ddpo"), "--measure-epoch"),
    (dict(fsdp=True), "--fsdp shards a fully fine-tuned denoiser"),
])
def test_bad_epoch_and_reward_flags_are_refused_first(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        main(PerfArgs(preset="tiny", algos="sdpo", device="cpu", out=str(tmp_path), **flags))


def test_reduced_sd_turbo_table(tmp_path):
    args = PerfArgs(
        preset="sd-turbo", reduced=True, resolution=64, algos="sdpo", batch_size=2, steps=1, repeats=1,
        device="cpu", gradient_checkpointing=True, baseline=False, tag="ckpt", out=str(tmp_path),
    )
    record = main(args)
    without_baseline = tuple(key for key in FIGURES if key not in PAIR_BASELINES)
    _check_outputs(record, tmp_path, "sd-turbo-reduced-cpu-ckpt", ["sdpo"], without_baseline)
    assert "sample_speedup" not in record["rows"][0]
    assert record["resolution"] == 64 and record["performance"]["gradient_checkpointing"]


def test_reduced_architectures_keep_the_real_layout():
    for preset in ("sd-turbo", "sd15", "lcm"):
        real, reduced = archs.load_configs(preset), archs.load_configs(preset, reduced=True)
        for key in ("down_block_types", "up_block_types", "attention_head_dim", "in_channels", "time_cond_proj_dim"):
            assert real["unet"].get(key) == reduced["unet"].get(key)
        assert reduced["unet"]["cross_attention_dim"] == reduced["text_encoder"]["hidden_size"]
        unet, vae, text, tokenizer = archs.build_components(reduced, resolution=64)
        assert unet.config.sample_size == 8 and tokenizer.model_max_length == 77
        ids = tokenizer(["a cat"], padding="max_length", return_tensors="pt").input_ids
        context = text(ids)[0]
        with torch.no_grad():
            out = unet(torch.randn(1, 4, 8, 8), torch.tensor([999]), encoder_hidden_states=context).sample
        assert out.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("preset, reduced, setting", [
    ("flux-schnell", True, "flux-schnell-reduced-cpu"), ("tiny-flow", False, "tiny-flow-cpu"),
])
def test_flow_tables(preset, reduced, setting, tmp_path):
    """The flow branch end to end on FLUX-shaped random weights and on the tiny flow
    world's transformer (a pair algorithm at K = 1; results/perf/flux-schnell-reduced-cpu.md
    has every algorithm at the preset's K)."""
    args = PerfArgs(preset=preset, reduced=reduced, resolution=32, algos="sdpo", batch_size=2, steps=1,
                    repeats=1, sample_calls=1, device="cpu", baseline=False, out=str(tmp_path))
    record = main(args)
    without_baseline = tuple(key for key in FIGURES if key not in PAIR_BASELINES)
    _check_outputs(record, tmp_path, setting, ["sdpo"], without_baseline)
    assert record["resolution"] == 32 and record["precision"] == "no"


@pytest.fixture
def process_group_after():
    """Closes the group of one that `--fsdp` opens in this process, so later tests see none."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True])
def test_full_fine_tuning_rows(fsdp, tmp_path, process_group_after):
    """Every weight of the tiny flow transformer trained, in one process or sharded over a
    group of one: the record counts the whole transformer as trained (against the LoRA's
    fraction of it), holds 16 bytes of training state a weight, and says so; GRPO's KL runs
    on the reference kept on the CPU."""
    args = PerfArgs(preset="tiny-flow", resolution=32, algos="grpo", batch_size=4, steps=2, repeats=1,
                    sample_calls=1, device="cpu", baseline=False, out=str(tmp_path), finetune="full", fsdp=fsdp)
    record = main(args)
    lora = main(replace(args, finetune="lora", fsdp=False, tag="lora"))
    assert record["finetune"] == "full" and record["processes"] == 1
    assert record["trained_parameters"] > 5 * lora["trained_parameters"]  # rank-32 LoRA: 15% of it
    # float32 weights, gradients and AdamW's two moments: 16 bytes a trained weight, and
    # AdamW's step count, 4 bytes a parameter tensor (712 bytes of 31.6 MB here).
    for made in (record, lora):
        assert made["rows"][0]["trained_state_gb"] == pytest.approx(16 * made["trained_parameters"] / 1e9, rel=1e-4)
    assert "train_transitions_s" in record["rows"][0] and "error" not in record["rows"][0]
    text = (tmp_path / "tiny-flow-cpu.md").read_text()
    assert "every weight of the denoiser" in text and ("FSDP2" in text) == fsdp


def test_a_default_sampling_call_holds_whole_groups():
    """8 trajectories a call (the SDPO paper's), raised to a whole group: 16 for GRPO and NFT
    on the flow presets, whose groups --batch-size 8 would split."""
    assert [perf.sampling_batch(PerfArgs(), g) for g in (1, 2, 16, 24)] == [8, 8, 16, 24]
    assert perf.sampling_batch(PerfArgs(batch_size=4), 2) == 4
    preset = PRESETS["flux-schnell"]()
    perf.check_sizes(["ddpo", "sdpo", "grpo", "nft"], preset, PerfArgs(), 4, 64)
    with pytest.raises(SystemExit, match="--batch-size 8 is not a multiple of grpo's group size 16"):
        perf.check_sizes(["sdpo", "grpo"], preset, PerfArgs(batch_size=8), 4, 64)


def test_steps_shorter_than_a_presets_training_window_are_refused_by_flag(tmp_path):
    """sd3.5-medium's GRPO trains 9 of its 10 steps: --steps 4 cannot hold that window."""
    with pytest.raises(SystemExit, match=r"--steps 4: grpo's config on --preset sd3.5-medium refuses it: window_size"):
        main(PerfArgs(preset="sd3.5-medium", reduced=True, algos="grpo", steps=4, device="cpu", out=str(tmp_path)))


def test_full_size_flow_architectures_need_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="--preset sd3.5-medium at full size.*T5-XXL.*--reduced"):
        main(PerfArgs(preset="sd3.5-medium", algos="sdpo", device="cpu", out=str(tmp_path)))


@pytest.mark.parametrize("preset, transformer, positions", [("sd3.5-medium", 2.243e9, 0.226e9), ("flux-schnell", 11.89e9, 0)])
def test_flow_architectures_have_their_published_sizes(preset, transformer, positions):
    """Counted on the meta device (no memory): SD3.5 Medium's MMDiT-X 2.24B parameters and
    its 384² x 1536 positional table (0.23B; the model card's 2.5B holds both), FLUX.1's
    11.9B (its "12B"), and T5 v1.1 XXL's encoder, 4.76B, in both."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    configs = archs.load_configs(preset)
    flux = configs["transformer"]["_class_name"] == "FluxTransformer2DModel"
    with torch.device("meta"):
        model = (FluxTransformer2DModel if flux else SD3Transformer2DModel).from_config(configs["transformer"])
        t5 = archs.build_text_encoder(configs["text_encoder_2" if flux else "text_encoder_3"])
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(transformer, rel=1e-3)
    assert sum(b.numel() for b in model.buffers()) == pytest.approx(positions, rel=1e-2)
    assert sum(p.numel() for p in t5.parameters()) == pytest.approx(4.762e9, rel=1e-3)


@pytest.mark.parametrize("preset", archs.FLOW_ARCHS)
def test_reduced_flow_architectures_keep_the_real_layout(preset):
    """Same classes, patching, heads, latent interface, scheduler and both block kinds; the
    conditioning widths follow the reduced encoders; a prediction goes through."""
    from zoo.flow_policy import FlowPolicy

    real, reduced = archs.load_configs(preset), archs.load_configs(preset, reduced=True)
    for key in ("_class_name", "patch_size", "in_channels", "num_attention_heads", "qk_norm", "guidance_embeds"):
        assert real["transformer"].get(key) == reduced["transformer"].get(key), key
    for key in ("latent_channels", "scaling_factor", "shift_factor", "down_block_types"):
        assert real["vae"][key] == reduced["vae"][key], key
    assert real["scheduler"] == reduced["scheduler"]
    transformer = reduced["transformer"]
    if preset == "flux-schnell":
        assert transformer["num_layers"] >= 1 and transformer["num_single_layers"] >= 1
        assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"] == 128 // 8
    else:
        # A dual-attention block, then a plain one (the last, whose context stream is pre-only).
        assert transformer["dual_attention_layers"] == [0] and transformer["num_layers"] == 2
    policy = FlowPolicy(archs.build_flow_pipeline(reduced, resolution=64), resolution=64)
    embeds = policy.encode_prompts(["a cat"])
    assert embeds.shape[-1] == transformer["joint_attention_dim"] == 4096 // 8
    latents = torch.randn(1, *policy.latent_shape)
    with torch.no_grad():
        assert policy.predict(latents, torch.tensor([500.0]), embeds, 1.0).shape == (1, 16, 8, 8)
