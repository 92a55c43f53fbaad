"""Downloads on first use, for real but without the internet: a local HTTP server speaks
the part of the hub API that huggingface_hub's `snapshot_download` uses, and HF_ENDPOINT
points at it (zoo.hub reads it at each call).

Endpoints served, for each repo folder under the server's root (one commit, `COMMIT`):
- GET  /api/models/{repo}/revision/{rev}  -> {"id", "sha", "siblings"}
- GET  /api/models/{repo}/tree/{rev}      -> [{"type": "file", "path", "size", "oid"}]
- HEAD /{repo}/resolve/{rev}/{path}       -> X-Repo-Commit, ETag, Content-Length
- GET  /{repo}/resolve/{rev}/{path}       -> the bytes (Range honoured)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rewards.catalog import REWARDS
from rewards.registry import load_reward
from rewards.weights import check_reward
from zoo import hub
from zoo.loading import PIPELINE_FILES, ModelUnavailable, load_policy, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL = "acme/tiny-turbo"
FLOW_MODEL = "acme/tiny-flux"
PICKSCORE = [artifact.hub_repo for artifact in REWARDS["pickscore"].artifacts]


class LocalHub:
    """A threaded HTTP server on 127.0.0.1 serving `root/<owner>/<name>/...` as hub repos.
    `cut` names a file whose GET sends half its bytes, then the server goes down."""

    def __init__(self, root: Path, cut: str | None = None):
        self.root, self.cut = root, cut
        self.requests: list[tuple[str, str]] = []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub_.answer(self, body=False)

            def do_GET(self):
                hub_.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> list[str]:
        folder = self.root / repo
        return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        self.requests.append((handler.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and parts[4] in ("revision", "tree"):
            repo = "/".join(parts[2:4])
            if parts[4] == "revision":
                info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in self.files(repo)]}
            else:
                info = [
                    {"type": "file", "path": name, "size": (self.root / repo / name).stat().st_size, "oid": _sha(self.root / repo / name)}
                    for name in self.files(repo)
                ]
            return self.send(handler, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        repo, name = "/".join(parts[:2]), "/".join(parts[4:])
        file = self.root / repo / name
        if parts[2:3] != ["resolve"] or not file.is_file():
            return self.send(handler, b"not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, body, 404)
        data = file.read_bytes()
        status, start = 200, 0
        if handler.headers.get("Range"):
            start = int(handler.headers["Range"].removeprefix("bytes=").split("-")[0])
            status = 206
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_sha(file)}"'}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if body and name == self.cut:
            # The network drops mid-file: half the bytes, then nothing answers any more.
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            threading.Thread(target=self.stop).start()
            return
        self.send(handler, data[start:], headers, body, status)

    @staticmethod
    def send(handler, data: bytes, headers: dict, body: bool, status: int = 200) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def downloaded(self, repo: str) -> set[str]:
        prefix = f"/{repo}/resolve/"
        return {path.split("/", 5)[5] for method, path in self.requests if method == "GET" and path.startswith(prefix)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, tiny_pipeline_dir) -> Path:
    """The tiny pipeline as MODEL, with the variants a real pipeline repo holds beside what
    stepzoo loads; a tiny CLIP folder as both repos of pickscore, with a .bin beside it."""
    from rewards.tiny_checkpoints import build_clip_folder

    root = tmp_path_factory.mktemp("hub")
    pipeline = root / MODEL
    shutil.copytree(tiny_pipeline_dir, pipeline)
    shutil.copy(pipeline / "unet/diffusion_pytorch_model.safetensors", pipeline / "unet/diffusion_pytorch_model.fp16.safetensors")
    (pipeline / "unet/diffusion_pytorch_model.bin").write_bytes(b"decoy")
    (pipeline / "tiny-turbo.safetensors").write_bytes(b"decoy single-file checkpoint")
    (pipeline / "safety_checker").mkdir()
    (pipeline / "safety_checker/config.json").write_text("{}")
    clip = build_clip_folder(tmp_path_factory.mktemp("clip") / "clip")
    for repo in PICKSCORE:
        shutil.copytree(clip, root / repo)
        (root / repo / "pytorch_model.bin").write_bytes(b"decoy")
    return root


@pytest.fixture
def local_hub(hub_root, tmp_path, monkeypatch):
    """A healthy server over `hub_root`, a fresh cache, online."""
    server = LocalHub(hub_root)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    yield server
    server.stop()


def _cached_files(repo: str) -> set[str]:
    snapshot = hub.cache_dir() / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    return {str(path.relative_to(snapshot)) for path in snapshot.rglob("*") if path.is_file()}


def test_a_preset_model_downloads_once_only_what_loads_and_loads(local_hub, hub_root):
    folder = resolve_model(MODEL)
    expected = {name for name in local_hub.files(MODEL) if any(Path(name).match(p) for p in PIPELINE_FILES)}
    assert "unet/diffusion_pytorch_model.safetensors" in expected
    assert local_hub.downloaded(MODEL) == expected == _cached_files(MODEL)  # no fp16, .bin or single file
    requests = len(local_hub.requests)
    policy = load_policy(MODEL)
    assert len(local_hub.requests) == requests  # cached: asked nothing more
    assert Path(folder).is_dir() and policy.unet.config.sample_size > 0
    reference = load_policy(str(hub_root / MODEL))
    assert all(torch.equal(a, b) for a, b in zip(policy.unet.parameters(), reference.unet.parameters()))


def test_reward_weights_download_and_load(local_hub):
    found = check_reward("pickscore")
    for artifact in REWARDS["pickscore"].artifacts:
        accepted = set(artifact.hub_companions).union(*artifact.files)
        downloaded = local_hub.downloaded(artifact.hub_repo)
        assert downloaded == _cached_files(artifact.hub_repo) and downloaded <= accepted
        assert "pytorch_model.bin" not in downloaded  # model.safetensors is there: one format only
    # transformers 5 saves processor_config.json, not the first choice preprocessor_config.json.
    assert "processor_config.json" in local_hub.downloaded(PICKSCORE[1])
    assert set(found) == {"weights", "processor"}
    reward = load_reward("pickscore")
    scores = reward.score(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), ["a cat", "a dog"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_offline_with_an_empty_cache_refuses_with_the_fix_first_and_asks_nothing(local_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as caught:
        resolve_model(MODEL)
    first, details = str(caught.value).split("\n")
    assert first.startswith(f"--model {MODEL}: not in the Hugging Face cache and HF_HUB_OFFLINE=1")
    assert f"fix: `hf download {MODEL} --revision main --include" in first and str(hub.cache_dir()) in details
    assert local_hub.requests == []


def test_a_download_cut_midway_fails_clearly_and_a_rerun_completes(local_hub, hub_root, monkeypatch):
    import huggingface_hub.file_download

    weights = "unet/diffusion_pytorch_model.safetensors"
    local_hub.stop()
    cutting = LocalHub(hub_root, cut=weights)
    monkeypatch.setenv("HF_ENDPOINT", cutting.url)
    # huggingface_hub waits a second before each of its 5 resumes; the server is gone anyway.
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda seconds: None)
    with pytest.raises(hub.DownloadFailed) as caught:
        resolve_model(MODEL)
    message = str(caught.value)
    assert message.startswith(f"downloading {MODEL} (revision main) from {cutting.url} failed")
    assert "Rerun the same command" in message and weights not in _cached_files(MODEL)

    healthy = LocalHub(hub_root)
    monkeypatch.setenv("HF_ENDPOINT", healthy.url)
    try:
        folder = Path(resolve_model(MODEL))
    finally:
        healthy.stop()
    assert (folder / weights).read_bytes() == (hub_root / MODEL / weights).read_bytes()
    load_policy(MODEL)


@pytest.fixture(scope="module")
def flow_repo(hub_root, tmp_path_factory) -> tuple[Path, set[str]]:
    """A tiny FLUX.1-schnell-shaped pipeline as FLOW_MODEL, its transformer in shards with
    their index (as the real repo's), beside what a FLUX or SD3.5 repo also holds and
    stepzoo never loads: the single-file checkpoints at its root, SD3.5's text_encoders/
    folder of single files, a .bin copy. Returns the repo folder and the files that load."""
    from diffusers import FluxTransformer2DModel

    from zoo.tiny.flux import build_random_flux_pipeline

    source = build_random_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipeline", seed=0)
    transformer = FluxTransformer2DModel.from_pretrained(source / "transformer")
    shutil.rmtree(source / "transformer")
    transformer.save_pretrained(source / "transformer", max_shard_size="200KB")
    loads = {str(path.relative_to(source)) for path in source.rglob("*") if path.is_file()}
    repo = hub_root / FLOW_MODEL
    shutil.copytree(source, repo)
    for decoy in ("flux1-schnell.safetensors", "ae.safetensors", "text_encoders/t5xxl_fp16.safetensors",
                  "transformer/diffusion_pytorch_model.bin"):
        (repo / decoy).parent.mkdir(exist_ok=True)
        (repo / decoy).write_bytes(b"decoy")
    return repo, loads


def test_a_flow_model_downloads_exactly_the_flow_pipeline_files_and_loads(local_hub, flow_repo):
    repo, loads = flow_repo
    assert any("-of-" in name for name in loads) and "transformer/diffusion_pytorch_model.safetensors.index.json" in loads
    folder = resolve_model(FLOW_MODEL, family="flow")
    assert local_hub.downloaded(FLOW_MODEL) == loads == _cached_files(FLOW_MODEL)
    requests = len(local_hub.requests)
    assert resolve_model(FLOW_MODEL, family="flow") == folder and len(local_hub.requests) == requests  # cached
    # The runner loads the folder resolve_model answers (`benchmarks.run`: model_source);
    # a hub id alone is found to be a flow model from its model_index.json.
    policy = load_policy(folder, resolution=32)
    assert policy.flux
    assert load_policy(FLOW_MODEL, resolution=32).flux
    assert len(local_hub.requests) == requests
    reference = load_policy(str(repo), resolution=32)
    assert all(torch.equal(a, b) for a, b in zip(policy.transformer.parameters(), reference.transformer.parameters()))


def test_a_flow_models_fp16_variant_is_not_downloaded(local_hub, flow_repo):
    repo, _ = flow_repo
    variant = "text_encoder_2/model.fp16.safetensors"
    (repo / variant).write_bytes(b"half-precision weights")  # bytes of its own: a blob of its own
    try:
        resolve_model(FLOW_MODEL, family="flow")
    finally:
        (repo / variant).unlink()
    assert variant not in local_hub.downloaded(FLOW_MODEL)
