"""A run folder as this checkout reads it, and the checks of --out, --resume and --extend.

A run folder (`--out`) holds config.json, the settings that identify its run (`Plan.config_json`,
read back by `recorded_setting`, which also reads runs recorded before a setting existed),
and records.jsonl, the evaluation rows of every finished job (`recorded_rows`). Before a
run starts, `check_out_dir` checks that the folder can take it (new, resumed with the same
settings, or replaced), and `extended` merges an extension with the run the folder holds.
This module only reads; the execution (`benchmarks.run`) writes the folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.cli import RESUME_MAY_CHANGE, RUN_FLAGS, SHARED_SAMPLER_FIELDS, UsageError, algo_flag, read_config
from benchmarks.portable import recorded_model
from benchmarks.train import BASE
from zoo import strict_json

if TYPE_CHECKING:
    from benchmarks.plan import Plan


RESUME_DEFAULTS = {"groups_per_prompt": 1, "ema": None, "num_processes": 1, "finetune": "lora", "fsdp": False}
"""Settings recorded in config.json since a later version, with the value that runs
recorded before them had, so that those runs can still be resumed."""
RESUME_DEFAULTS_FROM = {"curve_samples_per_prompt": "eval_samples_per_prompt"}
"""The same for settings whose earlier value was another setting's: before the curve's points
could use fewer samples, every evaluation used the final one's."""
ALGORITHM_CONFIG_DEFAULTS = {"flow_sde": "flow-grpo"}
"""The same for the fields of each recorded algorithm config (config.json "algorithm_configs")."""
ALGORITHM_FIELD_DEFAULTS = {"grpo": {"kl_form": "exact", "detach_unconditional": False}}
"""The same for one algorithm's own fields: GRPO's runs recorded before these fields replayed
its log-probs with the unconditional prediction attached and weighed the exact KL, so such a
run resumes or extends as it was made (a plain --resume of it is refused as a change of
settings unless its flags say so, --grpo.no-detach-unconditional)."""


EXTENSION_ADDS = ("algos", "algorithm_configs", "seeds", "algo_seeds")
"""Settings that an extension adds to (its new algorithms and seeds); it must match the rest."""


def recorded_setting(config: dict, key: str) -> Any:
    """A setting of a config.json as this checkout reads it: the model as the folder or hub
    id it names here (a relative folder is the same in every clone), each algorithm config
    with the fields it was recorded without."""
    value = config.get(key, config.get(RESUME_DEFAULTS_FROM.get(key), RESUME_DEFAULTS.get(key)))
    if key == "algorithm_configs":
        return {name: {**ALGORITHM_CONFIG_DEFAULTS, **ALGORITHM_FIELD_DEFAULTS.get(name, {}), **fields}
                for name, fields in value.items()}
    return recorded_model(value) if key == "model" and isinstance(value, str) else value


def _changed_settings(saved: dict, plan: Plan, may_change: tuple[str, ...]) -> list[str]:
    """The keys of config.json whose recorded value differs from `plan`'s."""
    current = json.loads(strict_json.dumps(plan.config_json()))
    return sorted(k for k in saved.keys() | current.keys()
                  if k not in may_change and recorded_setting(saved, k) != recorded_setting(current, k))


def _check_writable(out: Path) -> None:
    """Refuses an --out that cannot be made or written (a read-only file system, /proc, a
    path under a file), probed by making and removing a folder in its nearest existing
    ancestor, so that a run never trains only to fail at its first write."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, so no folder can be made under it; choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".stepzoo-probe-", dir=existing))
    except OSError as error:
        raise UsageError(
            f"--out {out}: no folder can be made in {existing} ({error.strerror or error}); choose a writable --out"
        ) from None


def check_out_dir(plan: Plan) -> None:
    out = plan.out_dir
    config_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    _check_writable(out)
    if not config_path.exists():
        if plan.args.resume:
            raise UsageError(f"--resume: {out} holds no run to resume (no config.json)")
        if plan.args.extend:
            raise UsageError(
                f"--extend: {out} holds no run to extend (no config.json); leave --extend out to start one there"
            )
        if out.is_dir() and any(out.iterdir()):
            raise UsageError(
                f"--out {out} is a folder with other files and no stepzoo run; choose a new or empty folder"
            )
        return
    if plan.args.resume:
        saved = read_config(config_path, "--resume")
        changed = _changed_settings(saved, plan, RESUME_MAY_CHANGE)
        if changed:
            differences = _differences(saved, plan, changed)
            raise UsageError(f"--resume: the run in {out} was started with other settings ({differences}); pass "
                             f"its values (--config {config_path} sets them)")
        return
    if not plan.args.overwrite and not plan.args.extend:
        raise UsageError(
            f"--out {out} already holds a run; pass --resume to continue it, --extend to add algorithms or seeds to it "
            "or --overwrite to replace it"
        )


def _setting_flag(key: str) -> str:
    """The flag that sets a config.json key, or what decides it (the prompts: the preset)."""
    if key in RUN_FLAGS:
        return "--" + key.replace("_", "-")
    if key == "num_processes":
        return "accelerate launch --num_processes"
    return f"--preset's {key.replace('_', ' ')}"


def _differences(saved: dict, plan: Plan, keys: list[str]) -> str:
    """The settings `keys` of config.json that differ between the recorded run (`saved`) and
    `plan`, each with its flag and both values; the algorithm configs field by field."""
    current = json.loads(strict_json.dumps(plan.config_json()))
    parts = []
    for key in keys:
        there, here = recorded_setting(saved, key), recorded_setting(current, key)
        if key != "algorithm_configs":
            parts.append(_difference(_setting_flag(key), there, here))
            continue
        for name in sorted(there.keys() | here.keys()):
            fields = there.get(name, {}), here.get(name, {})
            parts += [_difference(algo_flag(plan.args, name, field), fields[0].get(field, "–"), fields[1].get(field, "–"))
                      for field in sorted(fields[0].keys() | fields[1].keys()) if fields[0].get(field) != fields[1].get(field)]
    return "; ".join(parts)


def _difference(flag: str, saved: Any, current: Any, width: int = 60) -> str:
    """One setting that differs, by the flag that sets it, with both values when they are
    short (not prompt lists)."""
    there, here = (",".join(map(str, v)) if isinstance(v, list) else str(v) for v in (saved, current))
    if max(len(there), len(here)) > width:
        return f"{flag}: not the same"
    return f"{flag} {there} there, {here} here"


def recorded_rows(out: Path) -> dict[tuple[str, int], list[dict]]:
    """The rows of `out`/records.jsonl by (algo, seed), as written. `benchmarks.run.execute`
    writes an (algo, seed)'s rows only once it has finished, so each entry is final."""
    from benchmarks.checkpoint import read_jsonl

    rows: dict[tuple[str, int], list[dict]] = {}
    for line in read_jsonl(out / "records.jsonl"):
        row = json.loads(line)
        rows.setdefault((row["algo"], row["seed"]), []).append(row)
    return rows


def reused_rows(plan: Plan) -> dict[tuple[str, int], list[dict]]:
    """The recorded rows the run in `plan.out_dir` keeps: all of them but the algorithms it
    trains again (`--redo`)."""
    return {key: rows for key, rows in recorded_rows(plan.out_dir).items() if key[0] not in plan.redone}


def clear_redone(plan: Plan) -> None:
    """Remove what the run in `plan.out_dir` holds of the algorithms it trains again
    (`--redo`): their rows in records.jsonl and metrics.jsonl, their checkpoints (which a
    job would otherwise resume from), LoRA folders and sample strips. Main process only."""
    if not plan.redone:
        return
    from benchmarks.checkpoint import jsonl_exists, read_jsonl, write_jsonl

    out = plan.out_dir
    for name in ("records.jsonl", "metrics.jsonl"):
        path = out / name
        if jsonl_exists(path):
            rows = [json.loads(line) for line in read_jsonl(path)]
            write_jsonl(path, [row for row in rows if row["algo"] not in plan.redone])
    for algo in plan.redone:
        # checkpoints/: the checkpoint, and a remote job's metrics file (benchmarks.cluster.metrics_path)
        for leftover in [*out.glob(f"checkpoints/{algo}_seed*"), *out.glob(f"samples/{algo}_seed*_steps*.png")]:
            leftover.unlink()
        for folder in out.glob(f"lora/{algo}_seed*"):
            shutil.rmtree(folder)


def extended(plan: Plan, untrained: dict[str, list[str]]) -> Plan:
    """`plan` with the finished run in its --out ahead of its own algorithms and seeds:
    new algorithms train on every seed, every algorithm trains on the new seeds (with
    --partial-seeds: the algorithms of --algos on the seeds of --seeds they lack, the others
    keep theirs); refuses what would make the new rows incomparable with the recorded ones,
    and a flag of a recorded algorithm it does not train (`untrained`: algorithm -> fields
    its flags set) that differs from the recorded value, which could only be ignored."""
    out, config_path = plan.out_dir, plan.out_dir / "config.json"
    saved = read_config(config_path, "--extend")
    recorded_algos, recorded_seeds = saved["algos"], saved["seeds"]
    recorded_algo_seeds = {name: saved.get("algo_seeds", {}).get(name, recorded_seeds) for name in recorded_algos}
    algorithm_configs = recorded_setting(saved, "algorithm_configs")
    present = [name for name in plan.algos if name in recorded_algos]
    redone = tuple(present) if plan.args.redo else ()
    if plan.args.redo and not redone:
        raise UsageError(
            f"--redo: {out} holds none of {', '.join(plan.algos)} ({config_path} lists {', '.join(recorded_algos)}); "
            "name in --algos the recorded algorithms to train again"
        )
    if redone:  # trained again at this checkout's settings: nothing of theirs is compared with the records
        algorithm_configs = {name: c for name, c in algorithm_configs.items() if name not in redone}
        present = []
    new_seeds = [seed for seed in plan.seeds if seed not in recorded_seeds]
    if plan.args.partial_seeds:
        for name in present:
            dropped = [seed for seed in recorded_algo_seeds[name] if seed not in plan.seeds]
            if dropped:
                raise UsageError(
                    f"--extend --partial-seeds --seeds: {name} in {out} holds seeds "
                    f"{','.join(map(str, recorded_algo_seeds[name]))} ({config_path}); list them all in --seeds (with "
                    f"the seeds to add), e.g. --seeds {','.join(map(str, sorted({*recorded_algo_seeds[name], *plan.seeds})))}"
                )
    else:
        dropped_seeds = [seed for seed in recorded_seeds if seed not in plan.seeds]
        if dropped_seeds:
            raise UsageError(
                f"--extend --seeds: {out} holds seeds {','.join(map(str, recorded_seeds))} ({config_path}); list them "
                f"all in --seeds (with the seeds to add), e.g. --seeds {','.join(map(str, [*recorded_seeds, *new_seeds]))}"
            )
    complete = [name for name in present if all(seed in recorded_algo_seeds[name] for seed in plan.seeds)]
    if complete:
        raise UsageError(
            f"--extend --algos: {out} already holds {', '.join(complete)} on every seed of --seeds ({config_path} "
            f"lists {', '.join(recorded_algos)}); leave {'it' if len(complete) == 1 else 'them'} out of --algos, "
            "add seeds with --seeds, or pass --resume instead to finish an interrupted run, or --overwrite to redo "
            "the whole folder"
        )
    missing = [name for name in recorded_algos if name not in plan.algos]
    if new_seeds and missing and not plan.args.partial_seeds:
        raise UsageError(
            f"--extend --seeds {','.join(map(str, new_seeds))}: every algorithm of {out} trains on the new seeds; "
            f"list {', '.join(missing)} in --algos too (at the settings {config_path} records), or pass "
            f"--partial-seeds to add them to {', '.join(plan.algos)} only"
        )
    for name in algorithm_configs:
        for key in untrained.get(name, []):
            value = json.loads(strict_json.dumps(getattr(getattr(plan.args.algo, name), key)))
            if value != algorithm_configs[name].get(key):
                flag = f"--{name}.{key.replace('_', '-')}"
                raise UsageError(
                    f"{flag} {value}: --extend trains {', '.join(plan.algos)}, not {name}, whose rows in {out} are "
                    f"reused as recorded, with {key} {algorithm_configs[name].get(key)} ({config_path}); leave the "
                    f"flag out (or add {name} to --algos with new --seeds)"
                )
    changed = _changed_settings(saved, plan, (*RESUME_MAY_CHANGE, *EXTENSION_ADDS))
    if changed:
        differences = _differences(saved, plan, changed)
        raise UsageError(
            f"--extend: the run in {out} was made with other settings ({differences}); its base and algorithm "
            f"rows are reused, so every setting but --algos, --seeds and the per-algorithm flags must be as "
            f"{config_path} records it: pass its values, or choose another --out for a new run"
        )
    for name in present:
        recorded_config = algorithm_configs[name]
        current_config = json.loads(strict_json.dumps(dataclasses.asdict(plan.configs[name])))
        for key in sorted(recorded_config.keys() | current_config.keys()):
            if recorded_config.get(key) != current_config.get(key):
                flag = algo_flag(plan.args, name, key)
                raise UsageError(
                    f"{flag} {current_config.get(key)}: {name} in {out} trained with {key} "
                    f"{recorded_config.get(key)} ({config_path}), and its new seeds must train as its recorded ones "
                    f"did; pass {flag} {recorded_config.get(key)}"
                )
    for name, cfg in plan.configs.items():
        for recorded, recorded_config in algorithm_configs.items():
            for key in SHARED_SAMPLER_FIELDS:
                if key in recorded_config and getattr(cfg, key) != recorded_config[key]:
                    flag = algo_flag(plan.args, name, key)
                    raise UsageError(
                        f"{flag} {getattr(cfg, key)}: {recorded} in {out} trained with {key} {recorded_config[key]} "
                        f"({config_path}), and every algorithm of a run trains with the same sampler; pass "
                        f"{flag} {recorded_config[key]}"
                    )
    finished = recorded_rows(out)
    unfinished = [f"{name} seed {seed}" for seed in recorded_seeds for name in [BASE, *recorded_algos]
                  if seed in recorded_algo_seeds.get(name, recorded_seeds) and (name, seed) not in finished]
    if unfinished:
        raise UsageError(
            f"--extend: {out / 'records.jsonl'} has no rows of {', '.join(unfinished)}, so the run is unfinished; "
            "finish it with its own flags and --resume, then extend it"
        )
    added = [name for name in plan.algos if name not in recorded_algos]
    seeds = [*recorded_seeds, *new_seeds]
    algo_seeds = {name: [seed for seed in seeds if seed in recorded_algo_seeds.get(name, ()) or
                         (name in plan.algos and seed in plan.seeds)]
                  for name in [*recorded_algos, *added]}
    return dataclasses.replace(
        plan,
        algos=[*recorded_algos, *added],
        seeds=seeds,
        algo_seeds={name: own for name, own in algo_seeds.items() if own != seeds},
        configs={name: plan.configs[name] for name in [*present, *redone, *added]},
        recorded_configs={name: c for name, c in algorithm_configs.items() if name not in present},
        redone=redone,
    )

