"""The SDPO reference's own training script, timed at the paper's configuration beside
stepzoo's (issue 17): seconds per epoch of ZiyiZhang27/sdpo's `scripts/train_sdpo.py` on a
random-weight sd-turbo-shaped model with a JPEG reward, run outside this repository.

    python -m benchmarks.reference_sdpo --reference .ref/sdpo --wheels .refwhl            # a GPU
    python -m benchmarks.reference_sdpo --reduced --resolution 64 --steps 4 \\
        --mixed-precision no --batches-per-epoch 1                                        # a CPU

Nothing of the reference is copied into the repository: `--reference` names its files
outside it (or in the git-ignored `.ref/`, which the GPU machine receives as a carried
path, having no internet), and every run copies them into `--work`, checks that the
files that define the run are those of `REFERENCE_COMMIT`, installs `PACKAGES` there from
`--wheels`, writes the random-weight pipeline folder there, and starts the script through
`benchmarks.reference_sdpo_launch`, which applies `PATCHES` in memory. Once, where pip and
the reference can be fetched (the repository root; `.ref/` and `.refwhl/` are ignored):

    mkdir -p .ref/sdpo && git --git-dir=<a clone of github.com/ZiyiZhang27/sdpo>/.git archive \\
        fcee34d scripts config sdpo_pytorch ':!sdpo_pytorch/assets/*.pth' | tar -x -C .ref/sdpo
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux2014_x86_64 --platform any -d .refwhl \\
        diffusers==0.17.1 huggingface_hub==0.25.2 transformers==4.34.1 tokenizers==0.14.1 \\
        accelerate==0.20.3 ml_collections==1.1.0 absl-py==2.5.1 inflect==6.0.4 pydantic==1.10.27 \\
        setuptools==69.5.1

(130 kB of the reference, without its reward weights and images, and 14 MB of wheels;
`--python-version` that of the machine that runs it: the GPU machine's 3.12, this CPU
machine's 3.11, whose tokenizers wheel can sit beside the other.) The `fetch` tool brings
a clone as /work/.mirror/ZiyiZhang27+sdpo/repo. The model folder is saved in float16 (2.6 GB
for sd-turbo, half the bytes to write and read) and loads as float32, as from the hub.

The configuration is the paper's (`PAPER`: 8 prompts per sampling batch, each sampled
twice, 4 batches = 32 pairs = 64 trajectories per GPU per epoch, K = 50, minibatches of 2
pairs, accumulation 8, fp16) except `--batches-per-epoch`: fewer batches run a fraction of
the paper's epoch with the same call shapes (sampling calls of 8 trajectories, training
calls of 2 pairs), and the figures scale it to the paper's 4 batches, since an epoch's
sampling calls and training calls are both proportional to its batches. The reference
asserts that the epoch's pairs fill whole accumulated updates, so accumulation is
min(8, 4 x batches): 4 with one batch (the optimizer then steps twice as often, on LoRA
weights only).

Writes `reference-sdpo[-reduced]-<device>[-<tag>].md` and `.json` under `--out`, updated
after every epoch, so that a run stopped by a time limit keeps the epochs it finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

from benchmarks.portable import REPO_ROOT
from zoo import strict_json

REFERENCE = "ZiyiZhang27/sdpo"
REFERENCE_COMMIT = "fcee34db05c0beead0d76b58b09f843af821c68e"
REFERENCE_FILES = {
    "scripts/train_sdpo.py": "c3ad52a64184b6f3ecbe05695135e2acd465f920",
    "config/base_sdpo.py": "756989191ef16f9a6c684f8330cd8b2ff15556be",
    "config/config_sdpo.py": "a554637cdef8f84df474279d37fbc2c54b146dc9",
    "sdpo_pytorch/diffusers_patch/ddim_with_logprob_sdpo.py": "b66982482ffb3a2d46f98f1e7fdeac3a27ec58ac",
    "sdpo_pytorch/diffusers_patch/pipeline_with_logprob_sdpo.py": "2884d9dc9633b7414370915cd03e7bf3c3ec5c8c",
    "sdpo_pytorch/prompts.py": "73b7f2b3989e3b5baf50e34c890bbb57000b7081",
    "sdpo_pytorch/rewards.py": "a0bffd6e4decbe50ab5a37122f8b3fe61e4072dd",
    "sdpo_pytorch/stat_tracking.py": "21021f2466598bb52cbf0cd83ebea7ce72ae5a57",
    "sdpo_pytorch/assets/simple_animals.txt": "fd7918768d86b770c54098e9dede5cb5d2bdfecb",
}
"""Git blob ids, at REFERENCE_COMMIT, of the files that define the timed run: a copy is
checked against them without git (which the GPU machine may lack)."""

PACKAGES = (
    "diffusers==0.17.1",  # the reference's pin (setup.py); its LoRAAttnProcessor is the attention it trains
    "huggingface_hub==0.25.2",  # diffusers 0.17 imports `cached_download`, removed in huggingface_hub 0.26
    "transformers==4.34.1",  # the pin is 4.30.2, which needs tokenizers < 0.14: no wheel for Python 3.12
    "tokenizers==0.14.1",  # the oldest with Python 3.12 wheels
    "accelerate==0.20.3",  # the pin is 0.17; transformers 4.34 refuses accelerate < 0.20.3 at import
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "inflect==6.0.4",  # the reference's pin (its prompt functions import it)
    "pydantic==1.10.27",  # the pin is 1.10.9, which Python 3.12.4's typing breaks; inflect 6 needs pydantic 1
    "setuptools==69.5.1",  # gives accelerate 0.20 `distutils` on Python 3.12 (`import setuptools` installs it)
)
"""What the reference runs on, installed into `--work` ahead of the machine's packages;
torch, numpy, Pillow and the rest are the machine's (here torch 2.14, on the H100/H200
torch 2.11; the reference pins torch 2.0.1, which has no wheel for Python 3.12)."""

PATCHES = (
    "imp.load_source (config/config_sdpo.py:1; removed in Python 3.12) is provided where missing, and "
    "distutils (accelerate 0.20; removed in Python 3.12) comes from setuptools where missing",
    "wandb is a stub (wandb.Image builds nothing) and the Accelerator gets no log_with: no tracker, no network; "
    "the per-epoch JPEG thumbnails are still written",
    "the reward is stepzoo's JPEG compressibility (rewards/jpeg.py, DDPO's) added to sdpo_pytorch.rewards as "
    "jpeg_compressibility: the reference ships model rewards only, whose weights cannot be downloaded here",
    "config by its own flags: pretrained.model = the random-weight folder, reward_fn = jpeg_compressibility, "
    "num_epochs, sample.num_batches_per_epoch, train.gradient_accumulation_steps, logdir (and sample.num_steps, "
    "mixed_precision when asked)",
    "its tqdm loops of sampling, reward wait and training record their start and end (after a CUDA sync)",
)
"""The run-time patches (benchmarks/reference_sdpo_launch.py); no file of the copy is edited."""

PAPER = {
    "sample_batch_size": 8,  # config/config_sdpo.py:20 (prompts per batch; each sampled twice, scripts/train_sdpo.py:478, :488)
    "batches_per_epoch": 4,  # config/config_sdpo.py:21
    "train_batch_size": 2,  # config/config_sdpo.py:23 (pairs)
    "gradient_accumulation_steps": 8,  # config/config_sdpo.py:24
    "num_steps": 50,  # config/config_sdpo.py:13
    "epochs": 100,  # config/config_sdpo.py:15
    "mixed_precision": "fp16",  # config/base_sdpo.py:24
}
"""The SDPO paper's aesthetic configuration at REFERENCE_COMMIT, per GPU."""


@dataclass
class ReferenceArgs:
    """Seconds per epoch of the SDPO reference's training script on a random-weight model."""

    reference: str = ".ref/sdpo"
    """The reference's files at REFERENCE_COMMIT: a checkout or an extracted `git archive`."""
    wheels: str = ".refwhl"
    """Folder of the wheels of PACKAGES (see the module docstring)."""
    work: str = "/tmp/stepzoo-reference-sdpo"
    """Scratch folder outside the repository: the reference's copy, its packages, the model folder, its logs."""
    epochs: int = 2
    """Epochs to run (the first includes CUDA's warm-up)."""
    batches_per_epoch: int = PAPER["batches_per_epoch"]
    """Sampling batches of 8 prompts x 2 per epoch: the paper's 4, or 1-2 for a fraction of its epoch."""
    steps: int = PAPER["num_steps"]
    """Sampling steps K."""
    resolution: int = 512
    """Image side in pixels of the random-weight model."""
    reduced: bool = False
    """sd-turbo's architecture with widths / 8 (CPU-sized; `benchmarks.archs`)."""
    mixed_precision: str = PAPER["mixed_precision"]
    """The reference's accelerate precision: "fp16" (the paper's), "bf16" or "no"."""
    device: str = "auto"
    """Where the model folder is initialised: "cuda", "cpu" or "auto"; the reference itself runs where accelerate puts it."""
    tag: str = ""
    """Suffix of the output files' names."""
    out: str = "results/perf"
    """Folder for the .md and .json."""

    @property
    def accumulation(self) -> int:
        return min(PAPER["gradient_accumulation_steps"], 4 * self.batches_per_epoch)


def git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_inputs(args: ReferenceArgs) -> tuple[Path, Path, Path]:
    """(reference, wheels, work) resolved, or a SystemExit naming the flag and the fix."""
    reference, wheels, work = (Path(p).expanduser().resolve() for p in (args.reference, args.wheels, args.work))
    fetch = (f"extract {REFERENCE} at {REFERENCE_COMMIT[:7]} there (the git archive command of the "
             "module docstring)")
    if not (reference / "scripts" / "train_sdpo.py").is_file():
        raise SystemExit(f"--reference {args.reference}: no scripts/train_sdpo.py there; {fetch}")
    changed = [name for name, blob in REFERENCE_FILES.items()
               if not (reference / name).is_file() or git_blob_id(reference / name) != blob]
    if changed:
        raise SystemExit(f"--reference {args.reference}: {', '.join(changed)} differ from {REFERENCE} at "
                         f"{REFERENCE_COMMIT[:7]}; {fetch}")
    missing = [spec for spec in PACKAGES if not _wheels_of(wheels, spec)]
    if missing:
        raise SystemExit(f"--wheels {args.wheels}: no wheel of {', '.join(missing)}; download them with the "
                         "pip command of the module docstring")
    if work.is_relative_to(REPO_ROOT):
        raise SystemExit(f"--work {args.work}: inside the repository; the reference runs outside it (e.g. /tmp/...)")
    if args.batches_per_epoch < 1 or args.epochs < 1 or args.steps < 1:
        raise SystemExit("--batches-per-epoch, --epochs and --steps must be at least 1")
    if args.mixed_precision not in ("fp16", "bf16", "no"):
        raise SystemExit(f"--mixed-precision must be fp16, bf16 or no, got {args.mixed_precision!r}")
    return reference, wheels, work


def _wheels_of(folder: Path, spec: str) -> list[Path]:
    name, version = spec.split("==")
    stem = name.replace("-", "_").lower()
    return [p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]


def copy_reference(reference: Path, copy: Path) -> None:
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(reference, copy, ignore=shutil.ignore_patterns(".git", "logs", "__pycache__"))


def install_packages(wheels: Path, site: Path) -> None:
    """PACKAGES into `site` from `wheels` (pip picks the wheel of this Python), once."""
    marker = site / "stepzoo-installed.txt"
    if marker.is_file() and marker.read_text().split() == list(PACKAGES):
        return
    if site.exists():
        shutil.rmtree(site)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", str(site), "--find-links", str(wheels), *PACKAGES], check=True)
    marker.write_text("\n".join(PACKAGES) + "\n")


def model_folder(args: ReferenceArgs, work: Path) -> Path:
    """The random-weight sd-turbo pipeline folder, written once per shape."""
    import torch

    from benchmarks import archs

    folder = work / f"model-sd-turbo{'-reduced' if args.reduced else ''}-{args.resolution}"
    marker = folder / "stepzoo-complete"
    if not marker.is_file():
        if folder.exists():
            shutil.rmtree(folder)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        archs.save_random_pipeline(folder, "sd-turbo", args.resolution, reduced=args.reduced, device=device)
        marker.write_text("")
    return folder


def reference_flags(args: ReferenceArgs, model: Path, logs: Path) -> list[str]:
    return [
        "--config", "config/config_sdpo.py:aesthetic",
        f"--config.pretrained.model={model}",
        "--config.reward_fn=jpeg_compressibility",
        f"--config.num_epochs={args.epochs}",
        f"--config.sample.num_batches_per_epoch={args.batches_per_epoch}",
        f"--config.train.gradient_accumulation_steps={args.accumulation}",
        f"--config.sample.num_steps={args.steps}",
        f"--config.mixed_precision={args.mixed_precision}",
        f"--config.logdir={logs}",
    ]


def epoch_figures(events: list[dict], batches_per_epoch: int) -> dict:
    """Per epoch, from the launcher's timings: sampling (its loop and the wait for its
    rewards), training, and the whole epoch (from its sampling's start to the next one's,
    or to the end of `main`: checkpoint and logging included), each also scaled to the
    paper's batches per epoch. Only epochs that finished are counted."""
    times: dict[tuple[str, str], list[float]] = {}
    for event in events:
        times.setdefault((event["phase"], event["event"]), []).append(event["time"])
    waits = times.get(("Waiting for rewards", "end"), [])
    scale = PAPER["batches_per_epoch"] / batches_per_epoch
    epochs = []
    for epoch in range(len(waits)):
        sampling, training = f"Epoch {epoch}: sampling", f"Epoch {epoch}.0: training"
        following = times.get((f"Epoch {epoch + 1}: sampling", "start"), times.get(("main", "end")))
        if (training, "end") not in times or following is None:
            break
        started = times[(sampling, "start")][0]
        figures = {
            "epoch": epoch,
            "sampling_s": waits[epoch] - started,
            "training_s": times[(training, "end")][0] - times[(training, "start")][0],
            "epoch_s": following[0] - started,
        }
        figures.update({f"paper_{key}": value * scale for key, value in list(figures.items()) if key != "epoch"})
        epochs.append(figures)
    first = times.get(("Epoch 0: sampling", "start"))
    return {
        "start_s": first[0] - times[("main", "start")][0] if first else None,
        "epochs": epochs,
    }


def markdown(record: dict) -> str:
    paper = record["paper"]
    lines = [
        f"# SDPO reference ({REFERENCE} at {REFERENCE_COMMIT[:7]}): seconds per epoch",
        "",
        f"`{record['command']}`",
        "",
        f"- reference command (in {record['work']}/sdpo): `python -m benchmarks.reference_sdpo_launch TIMINGS "
        + " ".join(record["reference_flags"]) + "`",
        f"- model: random-weight sd-turbo architecture{' (reduced)' if record['args']['reduced'] else ''}, "
        f"{record['args']['resolution']}px, K = {record['args']['steps']}, {record['args']['mixed_precision']}; "
        "reward: JPEG compressibility",
        f"- epoch run: {record['args']['batches_per_epoch']} sampling batch(es) of {paper['sample_batch_size']} "
        f"prompts x 2 trajectories, minibatches of {paper['train_batch_size']} pairs, accumulation "
        f"{record['accumulation']}; paper epoch: {paper['batches_per_epoch']} batches (64 trajectories); "
        "'paper' columns scale the run's epoch to it",
        f"- packages: {', '.join(PACKAGES)}; torch {record['environment']['torch']} "
        f"(Python {record['environment']['python']}), on {record['environment']['device_name']}",
        "- run-time patches: " + "; ".join(PATCHES),
        f"- start (imports, pipeline load, LoRA) before the first epoch: "
        + (f"{record['start_s']:.1f} s" if record["start_s"] is not None else "–"),
        "",
        "| epoch | sampling s | training s | epoch s | paper epoch s | paper sampling s | paper training s "
        f"| {paper['epochs']} epochs h |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in record["epochs"]:
        lines.append(
            f"| {e['epoch']} | {e['sampling_s']:.3g} | {e['training_s']:.3g} | {e['epoch_s']:.3g} | "
            f"{e['paper_epoch_s']:.3g} | {e['paper_sampling_s']:.3g} | {e['paper_training_s']:.3g} | "
            f"{e['paper_epoch_s'] * paper['epochs'] / 3600:.3g} |"
        )
    if record.get("error"):
        lines += ["", f"Stopped: {record['error']}"]
    return "\n".join(lines) + "\n"


def side_by_side(perf_record: dict, reference_record: dict) -> str:
    """Markdown: seconds per paper epoch of stepzoo's SDPO (a `benchmarks.perf` record's
    sdpo row: projected, and measured when it was) beside the reference's last finished
    epoch, scaled alike to the paper's 64 trajectories, with their hours for the paper's
    100 epochs and the reference's time over stepzoo's (measured against measured where
    both were)."""
    row = next(r for r in perf_record["rows"] if r["algo"] == "sdpo")
    epochs = PAPER["epochs"]
    lines = [
        f"## SDPO's paper epoch ({PAPER['batches_per_epoch'] * PAPER['sample_batch_size'] * 2} trajectories, "
        f"K = {reference_record['args']['steps']}): stepzoo beside the reference",
        "",
        "| code | seconds per epoch | hours for 100 epochs | how |",
        "|---|---|---|---|",
        f"| stepzoo (projected) | {row['epoch_s']:.3g} | {row['epoch_s'] * epochs / 3600:.3g} | "
        f"{row['epoch_sample_calls']} sampling calls + {row['epoch_loss_calls']} loss calls (one UNet call each) at "
        "the measured rates |",
    ]
    ours = row["epoch_s"]
    if "measured_epoch_s" in row:
        ours = row["measured_epoch_s"]
        lines.append(f"| stepzoo (measured) | {ours:.3g} | {ours * epochs / 3600:.3g} | one epoch of "
                     f"{perf_record['measured_trajectories']} trajectories through the trainer (its micro-batch), "
                     "scaled |")
    if not reference_record["epochs"]:
        return "\n".join(lines + ["| reference | – | – | no epoch finished |"]) + "\n"
    last = reference_record["epochs"][-1]
    theirs = last["paper_epoch_s"]
    lines += [
        f"| reference (measured) | {theirs:.3g} | {theirs * epochs / 3600:.3g} | its epoch {last['epoch']} of "
        f"{reference_record['args']['batches_per_epoch']} sampling batch(es), scaled |",
        "",
        f"The reference takes {theirs / ours:.2f}x stepzoo's time per epoch.",
    ]
    return "\n".join(lines) + "\n"


def main(args: ReferenceArgs) -> dict:
    reference, wheels, work = check_inputs(args)
    import torch

    from benchmarks.perf import command_line

    work.mkdir(parents=True, exist_ok=True)
    copy, site, logs = work / "sdpo", work / "site", work / "logs"
    copy_reference(reference, copy)
    install_packages(wheels, site)
    model = model_folder(args, work)
    timings = work / "timings.jsonl"
    timings.unlink(missing_ok=True)
    flags = reference_flags(args, model, logs)
    on_gpu = torch.cuda.is_available()
    record = {
        "command": command_line(args, "benchmarks.reference_sdpo"),
        "args": asdict(args),
        "reference": REFERENCE,
        "reference_commit": REFERENCE_COMMIT,
        "reference_flags": flags,
        "work": str(work),
        "packages": list(PACKAGES),
        "patches": list(PATCHES),
        "paper": PAPER,
        "accumulation": args.accumulation,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        },
        "start_s": None,
        "epochs": [],
    }
    device = "cuda" if on_gpu else "cpu"
    setting = f"reference-sdpo{'-reduced' if args.reduced else ''}-{device}{'-' + args.tag if args.tag else ''}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def update() -> None:
        if timings.is_file():
            events = [json.loads(line) for line in timings.read_text().splitlines() if line.strip()]
            record.update(epoch_figures(events, args.batches_per_epoch))
        (out / f"{setting}.md").write_text(markdown(record))
        (out / f"{setting}.json").write_text(strict_json.dumps(record, indent=2) + "\n")

    # The reference's copy, then its packages, then this repository (the JPEG reward); the
    # machine's site-packages (torch) come after these, and stepzoo's own PYTHONPATH (a
    # newer diffusers) is left out.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (site, copy, REPO_ROOT))),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    log_path = work / "reference.log"
    print(f"running the reference in {copy} (its output: {log_path})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"stopped by SIGTERM (a time limit) after "
                                                         f"{len(record['epochs'])} finished epoch(s)"))
    reported = 0
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks.reference_sdpo_launch", str(timings), *flags],
                                   cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                time.sleep(1)
                update()
                for e in record["epochs"][reported:]:
                    print(f"epoch {e['epoch']}: {e['epoch_s']:.1f} s (sampling {e['sampling_s']:.1f}, training "
                          f"{e['training_s']:.1f}); paper epoch {e['paper_epoch_s']:.1f} s", flush=True)
                reported = len(record["epochs"])
        except SystemExit as stop:
            record["error"] = str(stop.code)
            raise
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait()
            update()
    if process.returncode:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        record["error"] = f"the reference exited with {process.returncode}"
        update()
        raise SystemExit(f"{record['error']}; the end of {log_path}:\n{tail}")
    print(markdown(record))
    return record


if __name__ == "__main__":
    main(tyro.cli(ReferenceArgs))
