"""Measure the shipped tiny world: `python -m zoo.tiny.evaluate`.

Writes results/tiny-world/{metrics.json, README.md, samples.png, samples-lcm.png}:
- the judge's zero-shot accuracy on fresh renders (its top caption among all captions);
- for the base (DDIM, eta 1, trailing), LCM and flow-matching (SD3-shaped, Euler ODE)
  pipelines, on the held-out prompts, at each step count: the tiny-clip reward
  (image-caption cosine similarity) and the fidelity ("correct colour and shape": the
  judge's top caption is the prompt);
- loading time and sampling throughput on this machine.
Sampling goes through the stock diffusers pipelines (StableDiffusionPipeline,
StableDiffusion3Pipeline), not the project's sampler. `--only-flow` measures the flow model
alone and adds it to the metrics.json and README.md already there.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from torchvision.utils import make_grid, save_image
from transformers import CLIPModel, CLIPProcessor

from zoo.loading import model_family
from zoo.tiny import ASSETS, DEFAULT_GUIDANCE, FLOW_GUIDANCE, TURBO_GUIDANCE, data
from zoo.tiny.flow import T5_TOKENS
from zoo import strict_json

GOLD_SECTION = "## Gold and proxy rewards"
"""The heading of the README's last section, the tiny rewards' gold and proxy measurements
(`python -m rewards.evaluate_tiny_gold` writes it; `write_readme` keeps it)."""


@dataclass(frozen=True)
class EvalConfig:
    out: Path = Path("results/tiny-world")
    assets: Path = ASSETS
    """Folder with clip/, pipeline/, pipeline-lcm/ (what `zoo.tiny.build --out` wrote)."""
    steps: tuple[int, ...] = (1, 2, 4, 8)
    samples_per_step: int = 64
    """Samples per step count, spread evenly over the held-out prompts."""
    guidance: float = DEFAULT_GUIDANCE
    guidance_sweep: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0)
    """Guidance scales at which the base model's 1- and 8-step fidelity is also measured,
    to justify the default."""
    judge_images_per_caption: int = 64
    seed: int = 0
    """Seeds the evaluation noise and renders; the build used other streams."""
    threads: int = 1
    """torch threads; 1 is robust to a shared CPU (see BuildConfig.threads)."""
    flow_guidance: float = FLOW_GUIDANCE
    only_flow: bool = False
    """Measure the flow model (<assets>/pipeline-flow) only, keeping the rest of <out>'s
    metrics.json."""
    only_turbo: bool = False
    """Measure the few-step students (<assets>/pipeline-turbo, pipeline-flow-turbo) only,
    keeping the rest of <out>'s metrics.json."""
    measure_folder: str | None = None
    """Print one JSON line of the step sweep of <assets>/<this folder> without guidance (a
    few-step student) and write nothing: what `zoo.tiny.compare_turbo` reads."""


class Judge:
    """The tiny CLIP judge, loaded and fed exactly like a real CLIP reward model."""

    def __init__(self, folder: Path, captions: list[str]):
        self.model = CLIPModel.from_pretrained(folder).eval()
        self.processor = CLIPProcessor.from_pretrained(folder)
        self.captions = captions
        with torch.no_grad():
            text = self.processor(text=captions, padding="max_length", return_tensors="pt")
            self.text_features = F.normalize(self.model.get_text_features(**text).pooler_output, dim=-1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> unit features (B, D), via the processor."""
        arrays = list((images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())
        pixels = self.processor(images=arrays, return_tensors="pt").pixel_values
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine similarity to the prompt (B,), whether the top caption is the prompt (B,))."""
        similarity = self.image_features(images) @ self.text_features.T  # (B, all captions)
        target = torch.tensor([self.captions.index(p) for p in prompts])
        reward = similarity.gather(1, target[:, None]).squeeze(1)
        return reward, similarity.argmax(1) == target


def judge_accuracy(judge: Judge, captions: list[str], per_caption: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(10_000 + seed)
    prompts = [c for c in captions for _ in range(per_caption)]
    _, correct = judge.score(data.render(prompts, generator), prompts)
    return correct.float().mean().item()


def load_pipeline(folder: Path) -> tuple[StableDiffusionPipeline | StableDiffusion3Pipeline, float]:
    started = time.perf_counter()
    if model_family(folder) == "flow":
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder)
    seconds = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)
    return pipe, seconds


@torch.no_grad()
def sample(pipe, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    """DDIM with eta 1 for the UNet pipelines; the flow pipeline's Euler ODE, with no T5
    tokens (`zoo.tiny.flow.T5_TOKENS`), at the data's image size."""
    if isinstance(pipe, StableDiffusion3Pipeline):
        options = dict(max_sequence_length=T5_TOKENS, height=data.IMAGE_SIZE, width=data.IMAGE_SIZE)
    else:
        options = dict(eta=1.0)
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **options,
    ).images  # (B, 3, 32, 32) in [0, 1]


def step_sweep(
    pipe, judge: Judge, cfg: EvalConfig, steps_list: tuple[int, ...], guidance: float
) -> tuple[list[dict], dict[int, torch.Tensor]]:
    heldout = data.heldout_captions()
    prompts = [heldout[i % len(heldout)] for i in range(cfg.samples_per_step)]
    rows, images_by_steps = [], {}
    for steps in steps_list:
        images = sample(pipe, prompts, steps, guidance, cfg.seed + steps)
        reward, correct = judge.score(images, prompts)
        rows.append(
            dict(
                steps=steps,
                guidance=guidance,
                reward_mean=reward.mean().item(),
                reward_std=reward.std().item(),
                fidelity=correct.float().mean().item(),
                count=len(prompts),
            )
        )
        images_by_steps[steps] = images
        print(f"  {steps} steps, guidance {guidance}: reward {rows[-1]['reward_mean']:.3f} fidelity {rows[-1]['fidelity']:.3f}", flush=True)
    return rows, images_by_steps


def throughput(pipe, cfg: EvalConfig, guidance: float, batch: int = 64, repeats: int = 3) -> dict[str, float]:
    """Images per second at `batch` prompts per call, median of `repeats` calls."""
    prompts = [data.heldout_captions()[0]] * batch
    rates = {}
    for steps in cfg.steps:
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            sample(pipe, prompts, steps, guidance, cfg.seed)
            seconds.append(time.perf_counter() - started)
        rates[f"{steps}_steps"] = batch / statistics.median(seconds)
    return rates


def save_grid(images_by_steps: dict[int, torch.Tensor], path: Path, per_cell: int = 3) -> None:
    """Rows: held-out prompts. Column groups: step counts, `per_cell` samples each."""
    n_prompts = len(data.heldout_captions())
    per_cell = min(per_cell, len(next(iter(images_by_steps.values()))) // n_prompts)
    tiles = []
    for prompt_index in range(n_prompts):
        for steps, images in images_by_steps.items():
            # Samples of prompt i sit at i, i + n_prompts, ... (prompts cycle).
            tiles.extend(images[prompt_index + n_prompts * k] for k in range(per_cell))
    grid = make_grid(torch.stack(tiles), nrow=per_cell * len(images_by_steps), padding=2, pad_value=0.5)
    grid = F.interpolate(grid[None], scale_factor=3, mode="nearest")[0]
    save_image(grid, path)


def _table(rows: list[dict], with_guidance: bool = False) -> str:
    head = "| guidance " if with_guidance else ""
    lines = [head + "| steps | tiny-clip reward (mean ± std) | fidelity | n |", "|---:" * (4 + with_guidance) + "|"]
    for r in rows:
        cell = f"| {r['guidance']} " if with_guidance else ""
        lines.append(cell + f"| {r['steps']} | {r['reward_mean']:.3f} ± {r['reward_std']:.3f} | {r['fidelity']:.3f} | {r['count']} |")
    return "\n".join(lines)


def _flow_section(metrics: dict) -> str:
    if "flow" not in metrics:
        return ""
    flow = metrics["flow"]
    build = metrics.get("build", {})
    return f"""
## Flow-matching model, held-out prompts
StableDiffusion3Pipeline (SD3-shaped transformer, {flow['parameters'] / 1e6:.2f}M parameters, on the base
model's frozen VAE and text encoder; zoo/tiny/flow.py), the Euler ODE of its
FlowMatchEulerDiscreteScheduler (shift {flow['shift']}), guidance {flow['guidance']} (`zoo.tiny.FLOW_GUIDANCE`),
{metrics['samples_per_step']} samples per step count; built by
`{build.get('stage_commands', {}).get('flow', 'python -m zoo.tiny.build --only flow')}` in
{build.get('stage_seconds', {}).get('flow', 'n/a')} s.

{_table(flow['steps'])}

At other guidance scales:

{_table(flow['guidance_sweep'], with_guidance=True)}

Sample grid: `samples-flow.png` (rows and columns as the others).
"""


def _flow_cost(metrics: dict) -> str:
    if "flow" not in metrics:
        return ""
    flow = metrics["flow"]
    rates = ", ".join(f"{k.replace('_', ' ')}: {v:.0f}" for k, v in flow["throughput"].items())
    return f"""- flow (two transformer passes per step with CFG), loading {flow['load_seconds']:.2f} s:
  {rates}
"""


def measure_flow(judge: Judge, cfg: EvalConfig) -> dict:
    pipe, seconds = load_pipeline(cfg.assets / "pipeline-flow")
    print("flow:", flush=True)
    rows, images = step_sweep(pipe, judge, cfg, cfg.steps, cfg.flow_guidance)
    save_grid(images, cfg.out / "samples-flow.png")
    sweep = [row for g in cfg.guidance_sweep for row in step_sweep(pipe, judge, cfg, (1, 8), g)[0]]
    return dict(
        guidance=cfg.flow_guidance,
        shift=pipe.scheduler.config.shift,
        parameters=sum(p.numel() for p in pipe.transformer.parameters()),
        steps=rows,
        guidance_sweep=sweep,
        load_seconds=seconds,
        throughput=throughput(pipe, cfg, cfg.flow_guidance),
    )


TURBO_FOLDERS = {"unet": ("pipeline-turbo", "base", "turbo"), "flow": ("pipeline-flow-turbo", "flow", "flow-turbo")}
"""Student -> (its folder, the metrics key of its teacher's rows, its build stage)."""


def measure_turbo(judge: Judge, cfg: EvalConfig) -> dict:
    students = {}
    for name, (folder, _, _) in TURBO_FOLDERS.items():
        pipe, seconds = load_pipeline(cfg.assets / folder)
        print(f"{folder}:", flush=True)
        rows, images = step_sweep(pipe, judge, cfg, cfg.steps, TURBO_GUIDANCE)
        save_grid(images, cfg.out / f"samples-{folder.removeprefix('pipeline-')}.png")
        students[name] = dict(steps=rows, load_seconds=seconds, throughput=throughput(pipe, cfg, TURBO_GUIDANCE))
    return students


def _step_columns(rows: list[dict]) -> list[str]:
    return [f"{r['steps']} step{'s' * (r['steps'] > 1)}" for r in rows]


def _cells(rows: list[dict]) -> str:
    return " | ".join(f"{r['fidelity']:.3f} / {r['reward_mean']:.3f}" for r in rows)


def _turbo_section(metrics: dict, methods: list[dict]) -> str:
    if "turbo" not in metrics:
        return ""
    build = metrics.get("build", {})
    records = build.get("stage_records", {})
    columns = _step_columns(metrics["base"])
    lines = ["| model | guidance | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for name, (folder, teacher, stage) in TURBO_FOLDERS.items():
        guidance = metrics[teacher]["guidance"] if teacher == "flow" else metrics["guidance"]
        teacher_rows = metrics[teacher]["steps"] if teacher == "flow" else metrics[teacher]
        lines.append(f"| {teacher} (teacher) | {guidance} | {_cells(teacher_rows)} |")
        method = records.get(stage, {}).get("method", "?")
        lines.append(f"| {folder} ({method}) | {TURBO_GUIDANCE} | {_cells(metrics['turbo'][name]['steps'])} |")
    method_lines = ["| stage | method | wall s | CPU s | examples | " + " | ".join(columns) + " |",
                    "|---|---|---:|---:|---:|" + "---:|" * len(columns)]
    for m in methods:
        method = m["method"] + (f" ({m['settings']})" if m.get("settings") else "")
        method_lines.append(f"| {m['stage']} | {method} | {m['build_seconds']} | {m['record'].get('cpu_seconds', '–')} "
                            f"| {m['record'].get('examples', '–')} | "
                            f"{_cells(m['steps'])} |")
    commands = "\n".join(f"- `{build.get('stage_commands', {}).get(stage, 'python -m zoo.tiny.build --only ' + stage)}`: "
                          f"{build.get('stage_seconds', {}).get(stage, 'n/a')} s wall, "
                          f"{records.get(stage, {}).get('cpu_seconds', 'n/a')} CPU s" for stage in ("turbo", "flow-turbo"))
    comparison = f"""
Methods compared (`python -m zoo.tiny.compare_turbo`, results/tiny-world/turbo-methods.json: each
built by the build's stage with every other setting at its default or as the row says, the
same seed, two at a time beside other jobs on this 2-core machine: wall seconds are inflated
by the sharing, CPU seconds (one thread) are what each stage costs; cells as above):

{chr(10).join(method_lines)}
""" if methods else ""
    return f"""
## Few-step (turbo) students, held-out prompts
The base UNet and the flow model distilled to sample without guidance (one network call per
step, `zoo.tiny.TURBO_GUIDANCE`), as sd-turbo and FLUX.1-schnell do (zoo/tiny/turbo.py):
the UNet student with DDIM eta 1 and trailing spacing, the flow student with the Euler ODE
of its scheduler (shift {metrics['flow']['shift']}), the same prompts and seeds as above. Cells: fidelity / tiny-clip
reward, {metrics['samples_per_step']} samples each.

{chr(10).join(lines)}

Built by:
{commands}
{comparison}
The tasks re-checked on the students (headroom and the proxies inside RL's pairs at every
step count, as the "Gold and proxy rewards" section below does for the base):
`gold-pipeline-turbo.md`, `gold-pipeline-flow-turbo.md` (`python -m rewards.evaluate_tiny_gold
--model pipeline-turbo`, `--model pipeline-flow-turbo`).

Sample grids: `samples-turbo.png`, `samples-flow-turbo.png` (rows and columns as the others).
Loading: {', '.join(f"{TURBO_FOLDERS[n][0]} {metrics['turbo'][n]['load_seconds']:.2f} s" for n in TURBO_FOLDERS)}; sampling
throughput, batch 64, images/s: {'; '.join(TURBO_FOLDERS[n][0] + ' ' + ', '.join(f"{k.replace('_', ' ')}: {v:.0f}" for k, v in metrics['turbo'][n]['throughput'].items()) for n in TURBO_FOLDERS)}.
"""


def _methods(out: Path) -> list[dict]:
    path = out / "turbo-methods.json"
    return json.loads(path.read_text()) if path.exists() else []


def write_readme(metrics: dict, path: Path) -> None:
    build = metrics.get("build", {})
    heldout = "\n".join(f"- {c}" for c in data.heldout_captions())
    text = f"""# The tiny world: measurements

Produced by `python -m zoo.tiny.evaluate` (this file, metrics.json and the PNGs) on
{metrics['machine']} (shared with other jobs), torch {metrics['torch']}, {metrics['threads']}
torch thread(s), from the artifacts built by `{build.get('command', 'python -m zoo.tiny.build')}`
(wall time {build.get('wall_seconds', 'n/a')} s; per stage: {build.get('stage_seconds', 'n/a')}).

Data: {len(data.all_captions())} captions ({len(data.COLOURS)} colours x {len(data.SHAPES)} shapes x
{len(data.BACKGROUNDS)} backgrounds), {len(data.train_captions())} for training and
{len(data.heldout_captions())} held out (every colour-shape pair still appears in training,
with the other background):
{heldout}

## Judge (tiny-clip)
Zero-shot accuracy (top caption among all {len(data.all_captions())} captions equals the
rendered one) on fresh renders, {metrics['judge']['images_per_caption']} per caption:
- held-out captions: {metrics['judge']['heldout_accuracy']:.4f}
- all captions: {metrics['judge']['all_accuracy']:.4f}

## Base model, held-out prompts
DDIM, eta 1, trailing spacing, guidance {metrics['guidance']} (`zoo.tiny.DEFAULT_GUIDANCE`),
{metrics['samples_per_step']} samples per step count. Fidelity = the judge's top caption
among all captions is the prompt ("correct colour, shape and background").

{_table(metrics['base'])}

## LCM-distilled model, held-out prompts
LCMScheduler, guidance {metrics['guidance']} through the guidance embedding (no second pass).

{_table(metrics['lcm'])}

Base model at other guidance scales (same prompts and seeds):

{_table(metrics['guidance_sweep'], with_guidance=True)}
{_flow_section(metrics)}{_turbo_section(metrics, _methods(path.parent))}
Sample grids (rows: held-out prompts in the order above; column groups: {', '.join(map(str, metrics['config']['steps']))} steps,
the first samples of each prompt): `samples.png` (base, DDIM), `samples-lcm.png` (LCM).
What they look like, and how the build was run: `notes.md` (written by hand).

## Cost on this CPU
- loading (`StableDiffusionPipeline.from_pretrained`): base {metrics['load_seconds']['base']:.2f} s,
  LCM {metrics['load_seconds']['lcm']:.2f} s; judge {metrics['load_seconds']['judge']:.2f} s
- sampling throughput, batch 64, images/s (base with CFG, i.e. two UNet passes per step):
  {', '.join(f"{k.replace('_', ' ')}: {v:.0f}" for k, v in metrics['throughput']['base'].items())}
- LCM (one UNet pass per step):
  {', '.join(f"{k.replace('_', ' ')}: {v:.0f}" for k, v in metrics['throughput']['lcm'].items())}
{_flow_cost(metrics)}"""
    # The gold and proxy rewards' section, written by `python -m rewards.evaluate_tiny_gold`,
    # stays at the end.
    old = path.read_text() if path.exists() else ""
    if GOLD_SECTION in old:
        text += "\n" + old[old.index(GOLD_SECTION) :]
    path.write_text(text)


def main() -> None:
    cfg = tyro.cli(EvalConfig)
    torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    judge = Judge(cfg.assets / "clip", data.all_captions())
    judge_seconds = time.perf_counter() - started
    judge_metrics = dict(
        images_per_caption=cfg.judge_images_per_caption,
        heldout_accuracy=judge_accuracy(judge, data.heldout_captions(), cfg.judge_images_per_caption, cfg.seed),
        all_accuracy=judge_accuracy(judge, data.all_captions(), cfg.judge_images_per_caption, cfg.seed),
    )
    print(f"judge: {judge_metrics}", flush=True)

    build_info = cfg.assets / "build_info.json"
    if cfg.measure_folder is not None:
        pipe, _ = load_pipeline(cfg.assets / cfg.measure_folder)
        rows, _ = step_sweep(pipe, judge, cfg, cfg.steps, TURBO_GUIDANCE)
        print(strict_json.dumps(rows), flush=True)
        return
    if cfg.only_flow or cfg.only_turbo:
        metrics = json.loads((cfg.out / "metrics.json").read_text())
        key, measure = ("flow", measure_flow) if cfg.only_flow else ("turbo", measure_turbo)
        metrics[key] = measure(judge, cfg)
        metrics["build"] = json.loads(build_info.read_text())
        (cfg.out / "metrics.json").write_text(strict_json.dumps(metrics, indent=2) + "\n")
        write_readme(metrics, cfg.out / "README.md")
        return

    base, base_seconds = load_pipeline(cfg.assets / "pipeline")
    print("base:", flush=True)
    base_rows, base_images = step_sweep(base, judge, cfg, cfg.steps, cfg.guidance)
    save_grid(base_images, cfg.out / "samples.png")
    print("base, guidance sweep:", flush=True)
    guidance_rows = [row for g in cfg.guidance_sweep for row in step_sweep(base, judge, cfg, (1, 8), g)[0]]
    if not (cfg.assets / "pipeline-lcm").is_dir():
        raise SystemExit(f"{cfg.assets}/pipeline-lcm is built by `python -m zoo.tiny.build`, not shipped: build it, "
                         "or measure the shipped students alone with --only-turbo (or the flow model with --only-flow)")
    lcm, lcm_seconds = load_pipeline(cfg.assets / "pipeline-lcm")
    print("lcm:", flush=True)
    lcm_rows, lcm_images = step_sweep(lcm, judge, cfg, cfg.steps, cfg.guidance)
    save_grid(lcm_images, cfg.out / "samples-lcm.png")

    metrics = dict(
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        torch=torch.__version__,
        threads=cfg.threads,
        guidance=cfg.guidance,
        samples_per_step=cfg.samples_per_step,
        judge=judge_metrics,
        base=base_rows,
        lcm=lcm_rows,
        guidance_sweep=guidance_rows,
        load_seconds=dict(base=base_seconds, lcm=lcm_seconds, judge=judge_seconds),
        throughput=dict(base=throughput(base, cfg, cfg.guidance), lcm=throughput(lcm, cfg, cfg.guidance)),
        build=json.loads(build_info.read_text()) if build_info.exists() else {},
        flow=measure_flow(judge, cfg),
        turbo=measure_turbo(judge, cfg),
    )
    (cfg.out / "metrics.json").write_text(strict_json.dumps(metrics, indent=2) + "\n")
    write_readme(metrics, cfg.out / "README.md")
    print(strict_json.dumps(metrics["throughput"]), flush=True)


if __name__ == "__main__":
    main()
