"""Full fine-tuning (`--finetune full`) and its sharding over processes (`--fsdp`): the same
numbers as DDP, checkpoints that resume exactly, and the settings refused before anything
loads."""

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.epochs import MinibatchShard, Shard
from benchmarks.run import main
from helpers.runs import cpu_launch, micro_args
from zoo.loading import load_policy

REPO = Path(__file__).resolve().parent.parent
SGD_RUN = str(REPO / "tests" / "distributed" / "sgd_run.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
ALGOS = ["ddpo", "grpo", "nft", "draft"]
"""A replay of every step (DDPO), one with the KL to the reference model (GRPO's beta 0.04: the
base weights copied in), a forward process against an old policy (NFT) and reward
back-propagation (DRaFT)."""


def _args(model: str, out: Path) -> list[str]:
    """Two epochs of the micro run, every weight trained with SGD (`SGD_RUN`: weights compare
    as closely as gradients), the EMA moved after every update; minibatches of 2 of the 4
    groups, so that DDP's processes hold unequal parts of them, and FSDP's equal ones."""
    return [
        *micro_args(model, out, "tiny-flow"), "--algos", ",".join(ALGOS), "--reward", "tiny-clip",
        "--finetune", "full", "--ema.decay", "0.5", "--ema.update-interval", "1",
        "--ddpo.train-batch-size", "2", "--ddpo.gradient-accumulation-steps", "2",
        "--grpo.train-batch-size", "2", "--nft.train-batch-size", "2",
        # SGD at DRaFT's rate barely moves a weight: a rate that moves them as the others do.
        "--draft.learning-rate", "30",
    ]


def _launch(model: str, out: Path, *flags: str, env: dict | None = None, sgd: bool = True) -> subprocess.CompletedProcess:
    """The micro run on 2 gloo processes, trained with SGD (`SGD_RUN`) or as `benchmarks.run` trains (AdamW)."""
    script = [SGD_RUN] if sgd else ["--module", "benchmarks.run"]
    command = [*cpu_launch(), *script, *_args(model, out), *flags]
    return subprocess.run(command, env=env or ENV, capture_output=True, text=True, timeout=600, cwd=out.parent)


def _records(out: Path) -> list[dict]:
    rows = [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
            for line in (out / "records.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["algo"], r["epoch"], r["split"], r["eval_steps"], r["reward"]))


def _weights(out: Path, algo: str) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / f"{algo}_seed0" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def fsdp_run(tiny_flow_pipeline_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    result = _launch(tiny_flow_pipeline_dir, out, "--fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_flow_pipeline_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = _launch(tiny_flow_pipeline_dir, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_fsdp_trains_to_the_numbers_of_ddp(fsdp_run, ddp_run, tiny_flow_pipeline_dir):
    """2 gloo processes, the whole SD3-shaped transformer trained: sharded (each process 1/2
    of the weights, gradients and optimizer state; each training an equal half of every
    minibatch of the gathered batch) and under DDP (each its own groups) take the same
    updates to the same weights, up to the order of float sums (measured: 6e-8 against
    moves of 1e-4 and more), and evaluate alike. The exported model folders load in
    diffusers."""
    fsdp, ddp = _records(fsdp_run), _records(ddp_run)
    assert [(r["algo"], r["epoch"], r["eval_steps"]) for r in fsdp] == [(r["algo"], r["epoch"], r["eval_steps"]) for r in ddp]
    assert {r["algo"] for r in fsdp} == {"base", *ALGOS}
    for a, b in zip(ddp, fsdp):
        assert (a["samples_seen"], a["optimizer_updates"], a["reward_calls"]) == (
            b["samples_seen"], b["optimizer_updates"], b["reward_calls"])
        torch.testing.assert_close(b["mean"], a["mean"], rtol=0, atol=1e-4, msg=str((a["algo"], a["epoch"])))
    base = load_file(Path(tiny_flow_pipeline_dir) / "transformer" / "diffusion_pytorch_model.safetensors")
    for algo in ALGOS:
        one, two = _weights(ddp_run, algo), _weights(fsdp_run, algo)
        assert one.keys() == two.keys() == base.keys()  # the weights and the buffers
        moved = max(float((one[k] - base[k].float()).abs().max()) for k in one)
        assert moved > 1e-5, algo  # every weight trains, not a frozen copy
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-3 * moved, msg=f"{algo} {name}")
    from diffusers import SD3Transformer2DModel

    loaded = SD3Transformer2DModel.from_pretrained(fsdp_run / "model" / "grpo_seed0")
    torch.testing.assert_close(dict(loaded.named_parameters())["proj_out.weight"].detach(),
                               _weights(fsdp_run, "grpo")["proj_out.weight"])


@pytest.mark.slow  # three more launches (about 1.5 minutes)
def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_numbers(tiny_flow_pipeline_dir, tmp_path):
    """Trained with AdamW (sharded moments) and killed while training NFT's second epoch, the
    sharded run resumes from the checkpoint of its first (whole weights, AdamW moments, old
    policy and EMA, gathered, then sharded again) to exactly the uninterrupted run's records
    and weights."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    uninterrupted = _launch(tiny_flow_pipeline_dir, whole, "--fsdp", sgd=False)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    killed = _launch(tiny_flow_pipeline_dir, out, "--fsdp", env={**ENV, "STEPZOO_KILL_AT": "train:nft:2"}, sgd=False)
    assert killed.returncode != 0
    assert not (out / "model" / "nft_seed0").exists()
    resumed = _launch(tiny_flow_pipeline_dir, out, "--fsdp", "--resume", sgd=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _records(out) == _records(whole)
    for algo in ALGOS:
        one, two = _weights(whole, algo), _weights(out, algo)
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=0, atol=0, msg=f"{algo} {name}")


def test_fsdp_without_full_fine_tuning_is_refused(tiny_flow_pipeline_dir, tmp_path, capsys):
    assert main([*micro_args(tiny_flow_pipeline_dir, tmp_path / "run", "tiny-flow"), "--fsdp"]) == 2
    assert "--fsdp shards a fully fine-tuned denoiser: pass --finetune full" in capsys.readouterr().err


def test_minibatch_shard_trains_an_equal_part_of_every_minibatch():
    """Under FSDP process r of 2 trains the r-th half of each global minibatch (by position:
    the minibatch's groups are a shuffle), at the weight of its share; between them, every
    group once."""
    minibatch = torch.tensor([5, 2, 7, 0])
    parts = [MinibatchShard(rank, 8, 2) for rank in range(2)]
    assert [minibatch[s.held(minibatch)].tolist() for s in parts] == [[5, 2], [7, 0]]
    assert all(s.start == 0 and s.size == 8 for s in parts)
    assert parts[0].weight(2, 4) == Shard(0, 8, 2).weight(2, 4) == 1.0


def test_full_fine_tuning_trains_every_weight_and_its_reference_is_the_base(tiny_flow_pipeline_dir):
    """Every weight of the denoiser trains, in float32; the reference model is the base
    weights kept on the CPU and copied in (the trained ones back after), and refused before
    they are kept; `trained_state` and `load_trained_state` round-trip the weights."""
    policy = load_policy(tiny_flow_pipeline_dir, full_finetune=True)
    params = policy.named_trainable_parameters()
    assert params.keys() == dict(policy.model.named_parameters()).keys()
    assert all(p.dtype == torch.float32 for p in params.values())
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    t, embeds = torch.tensor([500.0, 500.0]), policy.encode_prompts(["a cat", "a dog"])
    with pytest.raises(RuntimeError, match="keep_reference"):
        with policy.reference():
            pass
    policy.keep_reference()
    assert all(w.device.type == "cpu" for w in policy._reference_weights.values())
    before = policy.predict(x, t, embeds, 1.0)
    saved = policy.trained_state()
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01)
    moved = policy.predict(x, t, embeds, 1.0)
    assert (moved - before).abs().max() > 1e-3
    with policy.reference():
        torch.testing.assert_close(policy.predict(x, t, embeds, 1.0), before, rtol=0, atol=0)
    torch.testing.assert_close(policy.predict(x, t, embeds, 1.0), moved, rtol=0, atol=0)
    policy.load_trained_state(saved)
    torch.testing.assert_close(policy.predict(x, t, embeds, 1.0), before, rtol=0, atol=0)


@pytest.mark.parametrize("collective, calls", [(True, [2, 2]), (False, [2, 1])])
def test_a_sharded_policy_evaluates_in_as_many_sampling_calls_on_every_process(
    tiny_flow_pipeline_dir, monkeypatch, collective, calls
):
    """3 evaluation images on 2 processes, one per call: the first process samples 2, the
    second 1. A sharded denoiser gathers its weights from every process in each call, so the
    second process then makes a second call (on the first image's noise) and throws it away;
    its scores are its own image's alone. Unsharded, it makes one."""
    from benchmarks.evaluate import EvalSettings, evaluate
    from helpers.rewards import Brightness
    from zoo.sampling import TrajectorySampler

    policy = load_policy(tiny_flow_pipeline_dir)
    policy.collective_forward = collective
    real_sample, made = TrajectorySampler.sample, []

    def counted(self, prompts, **kwargs):
        made.append(list(prompts))
        return real_sample(self, prompts, **kwargs)

    monkeypatch.setattr(TrajectorySampler, "sample", counted)
    settings = EvalSettings(prompts=("a cat", "a dog", "a fox"), step_counts=(1,), samples_per_prompt=1,
                            batch_size=1, sampler="flow", guidance_scale=1.0, eta=1.0, seed=0)
    for rank, expected in enumerate(calls):
        made.clear()
        # One process in fact: gather_object hands back this process's own scores.
        process = SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0)
        stats, _ = evaluate(policy, {"brightness": Brightness()}, settings, process)
        assert len(made) == expected
        assert stats[(1, "brightness")]["count"] == (2 if rank == 0 else 1)


def test_a_saved_denoiser_loads_into_a_frozen_policy(tiny_flow_pipeline_dir, tmp_path):
    """`load_weights` reads back what `save_weights` wrote in full fine-tuning: a frozen
    policy given the folder predicts as the trained one; a folder without the weights file
    is refused, naming it."""
    trained = load_policy(tiny_flow_pipeline_dir, full_finetune=True)
    with torch.no_grad():
        for p in trained.named_trainable_parameters().values():
            p.add_(0.01)
    trained.save_weights(tmp_path / "model", write=True)
    frozen = load_policy(tiny_flow_pipeline_dir)
    x = torch.randn(2, *frozen.latent_shape, generator=torch.Generator().manual_seed(0))
    t, embeds = torch.tensor([500.0, 500.0]), frozen.encode_prompts(["a cat", "a dog"])
    base = frozen.predict(x, t, embeds, 1.0)
    frozen.load_weights(tmp_path / "model")
    moved = frozen.predict(x, t, embeds, 1.0)
    assert (moved - base).abs().max() > 1e-3
    torch.testing.assert_close(moved, trained.predict(x, t, embeds, 1.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no diffusion_pytorch_model.safetensors"):
        frozen.load_weights(tmp_path)
