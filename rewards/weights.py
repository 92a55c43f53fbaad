"""Where a registered reward's weights are found, and the cheap preflight of one
`--reward` term (`check_reward`).

`check_reward` only looks at the file system and at `importlib.util.find_spec`: it
imports no torch and loads no model, so the benchmark can call it for every reward
before it builds a pipeline, and fail in a second with one readable paragraph. A plugin
term is checked by `rewards.plugins.plugin_class`, a server term by its health endpoint.

Weights are looked up, for each file or folder a reward needs, in this order (the
first place that is set is used; a place that is set but incomplete is an error,
never a reason to look further):
1. a path given by the caller (`--reward-path NAME=PATH`; a reward's second artifact
   as `--reward-path NAME:ROLE=PATH`, e.g. `aesthetic:clip=/models/clip-vit-l-14`),
2. the environment variable `STEPZOO_<NAME>_PATH` (`STEPZOO_<NAME>_<ROLE>_PATH`),
   the name upper-cased with `-` and `.` turned into `_`,
3. a default local location where one exists (tiny-clip's folder in the repository),
4. the Hugging Face hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`), where an artifact
   published on the hub is downloaded on first use (only its files, at `hub_revision`;
   `zoo.hub`). Offline (`HF_HUB_OFFLINE=1`) or without network, the check refuses with
   a first line that names the `hf download` command that fetches what is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from rewards.catalog import PRIMARY, REWARDS, Artifact, RewardSpec
from rewards.errors import DamagedRewardWeights, MissingRewardPackages, MissingRewardWeights
from rewards.plugins import plugin_class
from rewards.spec import PLUGIN_NAME, SERVER_NAME, parse_reward_spec, path_key
from zoo import hub


REAL_REWARDS_INSTALL = (
    "pip install -e '.[real-rewards]' && pip install --no-deps image-reward==1.5 hpsv2x==1.2.0 "
    "(or `make venv`)"
)


def env_var(name: str, role: str = PRIMARY) -> str:
    """STEPZOO_<NAME>_PATH for the primary artifact, STEPZOO_<NAME>_<ROLE>_PATH otherwise."""
    parts = [name] if role == PRIMARY else [name, role]
    stem = "_".join(part.upper().replace("-", "_").replace(".", "_") for part in parts)
    return f"STEPZOO_{stem}_PATH"


def _complete(path: Path, artifact: Artifact) -> Path | None:
    """The artifact's path at `path` if every needed file is there, else None. A file
    artifact may be named directly or by the folder that holds it."""
    if not artifact.folder:
        filename = artifact.files[0][0]
        if path.is_file():
            return path
        return path / filename if (path / filename).is_file() else None
    return None if _absent_groups(path, artifact) else path


def _from_hub(artifact: Artifact) -> Path | None:
    """The artifact in the hub cache, downloaded first if it is not there; None when the
    pinned revision lacks its files. Raises HubUnreachable or DownloadFailed (zoo.hub)."""
    folder = hub.snapshot(artifact.hub_files(), lambda folder: _complete(folder, artifact) is not None)
    absent = _absent_groups(folder, artifact)
    if absent:
        # The first names are the usual ones; the repo may publish another accepted name.
        folder = hub.download(artifact.hub_files(absent))
    return _complete(folder, artifact)


def _describe_files(artifact: Artifact, groups: tuple[tuple[str, ...], ...] | None = None) -> str:
    return ", ".join(" or ".join(group) for group in (artifact.files if groups is None else groups))


def _missing_files(path: Path, artifact: Artifact) -> str:
    if not path.exists():
        return "which does not exist"
    if not artifact.folder:
        return f"which is neither {artifact.files[0][0]} nor a folder holding it"
    return f"which lacks {_describe_files(artifact, _absent_groups(path, artifact))}"


def _absent_groups(folder: Path, artifact: Artifact) -> tuple[tuple[str, ...], ...]:
    """The groups of `artifact.files` of which `folder` holds no file."""
    return tuple(group for group in artifact.files if not any((folder / name).is_file() for name in group))


def _missing_paragraph(spec: RewardSpec, problems: list[tuple[Artifact, str]], unreachable: str | None) -> str:
    """The refusal: a first line with what is missing and the one command (or flag) that
    fixes it, then one paragraph of details. `unreachable` is why the hub could not be
    asked (offline, no network), when it could have supplied the weights."""
    fetch = [artifact.hub_files().command() for artifact, _ in problems if artifact.hub_repo and unreachable]
    flags = [f"--reward-path {path_key(spec.name, artifact.role)}=PATH" for artifact, _ in problems
             if not (artifact.hub_repo and unreachable)]
    fixes = ([f"`{' && '.join(fetch)}`"] if fetch else []) + flags
    why = f"its weights are not in the Hugging Face cache and {unreachable}" if fetch else problems[0][1]
    first = f"Reward '{spec.name}' cannot be loaded: {why}; fix: {' and '.join(fixes)}"
    parts = []
    for artifact, looked in problems:
        key = path_key(spec.name, artifact.role)
        where = [f"pass --reward-path {key}=PATH", f"set {env_var(spec.name, artifact.role)}"]
        if artifact.default_path is not None:
            where.append(f"put it at {artifact.default_path.expanduser()}")
        if artifact.hub_repo is not None:
            where.append(
                f"let it download into the Hugging Face cache ({hub.cache_dir()}) with network and without "
                f"HF_HUB_OFFLINE, or fetch it there on a machine with access (`{artifact.hub_files().command()}`) "
                "and copy the cache here"
            )
        parts.append(
            f"It needs {artifact.what} ({'a folder with ' if artifact.folder else 'file '}{_describe_files(artifact)}), "
            f"published at {artifact.published}; {looked}. To fix: {', or '.join(where)}."
        )
    return first + "\n" + " ".join(parts)


def _damaged_json(folder: Path) -> str | None:
    """What is wrong with the first JSON file of a weights folder that does not parse (a
    model's config, its processor's or tokenizer's), or None when all of them do."""
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_text())
        except (ValueError, OSError) as error:
            return f"{file.name} is not valid JSON ({' '.join(str(error).split())})"
    return None


def check_reward(
    name: str, path: str | Path | None = None, paths: dict[str, str | Path] | None = None, flag: str = "--reward"
) -> dict[str, Path]:
    """Preflight for one reward: packages importable and every weight file found, weights
    published on the hub downloaded into its cache first if they are not there, and the
    JSON files of a weights folder readable (a damaged copy fails here, not at loading).

    `path` is the reward's `--reward-path` (primary artifact); `paths` may hold the same
    and the `NAME:ROLE` keys of the other artifacts. Returns role -> local path. Raises
    MissingRewardPackages (one paragraph), MissingRewardWeights (a line naming the fix,
    then details) or DamagedRewardWeights (one line), all RewardUnavailable, or
    zoo.hub.DownloadFailed when a download
    breaks off; imports no torch and loads nothing. A plugin is checked by `plugin_class`
    and a server by its health endpoint (RewardServerError); both return {}. `flag` is
    the option that named the reward, for the messages.
    """
    if name not in REWARDS:
        if re.fullmatch(SERVER_NAME, name):
            from rewards.http import HttpReward

            HttpReward.from_env(name).health()
            return {}
        if re.fullmatch(PLUGIN_NAME, name):
            plugin_class(name, flag)
            return {}
        parse_reward_spec(name, flag)
    spec = REWARDS[name]
    given = dict(paths or {})
    if path is not None:
        given[name] = path

    missing_packages = [module for module in spec.packages if importlib.util.find_spec(module) is None]
    if missing_packages:
        install = REAL_REWARDS_INSTALL if spec.extra else "pip install -e ."
        raise MissingRewardPackages(
            f"Reward '{spec.name}' needs the Python packages {', '.join(missing_packages)}, which are not "
            f"importable here; install them with {install}."
        )

    found: dict[str, Path] = {}
    problems: list[tuple[Artifact, str]] = []
    unreachable = None
    for artifact in spec.artifacts:
        key = path_key(spec.name, artifact.role)
        variable = env_var(spec.name, artifact.role)
        if given.get(key) is not None:
            source, location = f"--reward-path {key}", Path(given[key]).expanduser()
        elif os.environ.get(variable):
            source, location = variable, Path(os.environ[variable]).expanduser()
        else:
            source, location = None, None
        if location is not None:
            hit = _complete(location, artifact)
            if hit is None:
                problems.append((artifact, f"{source} points at {location}, {_missing_files(location, artifact)}"))
            else:
                found[artifact.role] = hit
                damaged = _damaged_json(hit) if artifact.folder else None
                if damaged:
                    raise DamagedRewardWeights(
                        f"{source} points at {location}, whose {damaged}; the folder is damaged: replace it with "
                        f"an intact copy of {artifact.what} ({artifact.published})"
                    )
            continue
        hit = _complete(artifact.default_path.expanduser(), artifact) if artifact.default_path is not None else None
        looked = f"neither --reward-path {key} nor {variable} is set and no default location has it"
        if hit is None and artifact.hub_repo is not None:
            try:
                hit = _from_hub(artifact)
            except hub.HubUnreachable as reason:
                unreachable = str(reason)
            else:
                looked = f"the hub repo {artifact.hub_repo} at revision {artifact.hub_revision} lacks some of them"
        if hit is None:
            problems.append((artifact, looked))
        else:
            found[artifact.role] = hit
            damaged = _damaged_json(hit) if artifact.folder else None
            if damaged:
                raise DamagedRewardWeights(
                    f"Reward '{spec.name}': {hit}, where {artifact.what} was found, is damaged: its {damaged}; "
                    f"delete it to fetch it again, or pass --reward-path {key}=PATH to an intact copy"
                )
    if problems:
        raise MissingRewardWeights(_missing_paragraph(spec, problems, unreachable))
    return found
