"""Reward servers, `--reward http://HOST:PORT/NAME`: rewards.serve and rewards.http against
each other on 127.0.0.1, and the client against servers that die, hang or answer garbage."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rewards.base import Reward
from rewards.errors import RewardServerError
from rewards.http import HttpReward
from rewards.registry import load_reward
from rewards.serve import main as serve_main
from rewards.serve import make_server, route
from rewards.spec import parse_reward_spec
from rewards.weights import check_reward

from helpers.rewards import Brightness
from helpers.servers import serving

FAST = dict(timeout=2.0, retries=2, backoff=0.01)
"""Client settings for tests: failures are reported in well under a second."""


class MeanPixel(Brightness):
    """The mean pixel value (Brightness, served under its own name): it reads every bit of
    the input, so it shows the 8-bit wire."""

    name = "mean-pixel"


@contextmanager
def served(reward: Reward):
    """The URL of `reward` served by rewards.serve."""
    with serving(make_server(reward)) as base:
        yield base + route(reward)


@contextmanager
def scripted(answers: list[tuple[int, bytes]], hang: threading.Event | None = None):
    """A server answering its i-th request with answers[i] (the last one after that), after
    waiting for `hang` to be set when given. Yields (url, list of request paths seen)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.path)
            if hang is not None:
                hang.wait(10)
            status, body = answers[min(len(seen), len(answers)) - 1]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as base:
        yield base + "/scorer", seen


def images(batch: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


PROMPTS = ["a", "b", "c"]
SCORES = json.dumps({"scores": [0.5, 1.5, -2.0]}).encode()


# --- the real server -----------------------------------------------------------------


def test_served_jpeg_reward_scores_as_the_local_one():
    """JpegSize rounds to 8 bits before encoding, as the wire does: the scores are equal."""
    local = load_reward("jpeg_compressibility")
    batch = images()
    with served(local) as url:
        remote = load_reward(url)
        assert isinstance(remote, HttpReward) and remote.name == url
        scores = remote.score(batch, PROMPTS)
    assert torch.equal(scores, local.score(batch, PROMPTS))
    assert remote.calls == 1 and remote.images_scored == 3


def test_quantisation_happens_on_the_wire_and_only_there():
    """A reward that reads every bit gets the 8-bit images: equal to the local score of
    round(255 x) / 255, and within half a level of the unrounded score."""
    batch = images()
    local = MeanPixel()
    with served(local) as url:
        scores = HttpReward(url, **FAST).score(batch, PROMPTS)
    rounded = (batch * 255).round() / 255
    assert torch.equal(scores, local.score(rounded, PROMPTS))
    exact = local.score(batch, PROMPTS)
    assert not torch.equal(scores, exact)
    assert (scores - exact).abs().max() <= 0.5 / 255


def test_server_in_a_weighted_sum_with_a_registered_reward():
    batch = images()
    with served(MeanPixel()) as url:
        assert parse_reward_spec(f"jpeg_compressibility,{url}:-2") == [("jpeg_compressibility", 1.0), (url, -2.0)]
        total = load_reward(f"jpeg_compressibility,{url}:-2").score(batch, PROMPTS)
    jpeg = load_reward("jpeg_compressibility").score(batch, PROMPTS)
    torch.testing.assert_close(total, jpeg - 2 * MeanPixel().score((batch * 255).round() / 255, PROMPTS))


def test_health_check_returns_the_served_name_and_wrong_path_is_named():
    with served(load_reward("jpeg_compressibility")) as url:
        assert check_reward(url) == {}
        assert HttpReward(url, **FAST).health() == "jpeg_compressibility"
        wrong = url.replace("jpeg_compressibility", "aesthetic")
        with pytest.raises(RewardServerError, match=f"{wrong} answered HTTP 404.*serves /jpeg_compressibility"):
            check_reward(wrong)
        with pytest.raises(RewardServerError, match=f"{wrong} answered HTTP 404.*serves /jpeg_compressibility"):
            HttpReward(wrong, **FAST).score(images(), PROMPTS)


@pytest.mark.parametrize(
    "body, complaint",
    [
        (b"not json", "bad request"),
        (json.dumps({"prompts": ["a"], "shape": [1, 3, 2, 2], "dtype": "float32", "images": ""}), '"dtype"'),
        (json.dumps({"prompts": ["a"], "shape": [1, 3, 2, 2], "dtype": "uint8", "images": "AAAA"}), "holds 3 bytes"),
        (json.dumps({"prompts": [1], "shape": [1, 3, 1, 1], "dtype": "uint8", "images": "AAAA"}), '"prompts"'),
        (json.dumps({"prompts": [], "shape": [1, 3, 1, 1], "dtype": "uint8", "images": "AAAA"}), '1 images but 0'),
        (b"[1, 2]", "must be a JSON object"),
    ],
)
def test_server_refuses_a_malformed_request_with_400(body, complaint):
    with served(MeanPixel()) as url:
        data = body if isinstance(body, bytes) else body.encode()
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5)
    assert caught.value.code == 400 and complaint in json.loads(caught.value.read())["error"]


def test_serve_command_refuses_an_unknown_reward(capsys):
    assert serve_main(["aesthetik", "--port", "0"]) == 2
    assert "unknown reward 'aesthetik'" in capsys.readouterr().err


# --- failures --------------------------------------------------------------------------


def test_dead_server_is_named_after_the_retries(monkeypatch):
    waits = []
    monkeypatch.setattr("rewards.http.time.sleep", waits.append)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/scorer"
    with pytest.raises(RewardServerError) as caught:
        HttpReward(url, **FAST).score(images(), PROMPTS)
    assert len(waits) == 2  # two retries after the first refusal
    message = str(caught.value)
    assert f"Reward server {url} refused the connection" in message and "after 3 attempts" in message
    assert "python -m rewards.serve" in message and "\n" not in message


def test_dead_server_fails_the_preflight(monkeypatch):
    monkeypatch.setenv("STEPZOO_REWARD_HTTP_RETRIES", "0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/scorer"
    with pytest.raises(RewardServerError, match=f"{url} refused the connection, after 1 attempt\\."):
        load_reward(f"jpeg_compressibility,{url}:0.5")


def test_hanging_server_times_out_naming_the_url():
    release = threading.Event()
    with scripted([(200, SCORES)], hang=release) as (url, seen):
        start = time.perf_counter()
        try:
            with pytest.raises(RewardServerError, match=f"{url} did not answer within 0.2 s, after 2 attempts"):
                HttpReward(url, timeout=0.2, retries=1, backoff=0.01).score(images(), PROMPTS)
        finally:
            waited = time.perf_counter() - start
            release.set()
    assert len(seen) == 2 and waited < 2.0


@pytest.mark.parametrize(
    "body, complaint",
    [
        (b"<html>oops</html>", "answered something that is not JSON: b'<html>oops</html>'"),
        (b"[0.5, 1.5, -2.0]", "not a JSON object"),
        (json.dumps({"scores": [0.5, 1.5]}).encode(), "returned 2 scores for 3 images"),
        (json.dumps({"score": [0.5, 1.5, -2.0]}).encode(), '"scores": None for 3 images'),
        (b'{"scores": [0.5, NaN, 1.0]}', "not all finite numbers"),
        (b'{"scores": [0.5, "1.5", 1.0]}', "not all finite numbers"),
    ],
)
def test_garbage_answer_is_an_error_naming_the_url_and_not_retried(body, complaint):
    with scripted([(200, body)]) as (url, seen):
        with pytest.raises(RewardServerError) as caught:
            HttpReward(url, **FAST).score(images(), PROMPTS)
    assert f"Reward server {url} " in str(caught.value) and complaint in str(caught.value)
    assert len(seen) == 1


def test_unavailable_server_is_retried_with_doubling_backoff(monkeypatch):
    waits = []
    monkeypatch.setattr("rewards.http.time.sleep", waits.append)
    answers = [(503, b'{"error": "warming up"}'), (503, b""), (502, b""), (200, SCORES)]
    with scripted(answers) as (url, seen):
        scores = HttpReward(url, timeout=2.0, retries=3, backoff=0.5).score(images(), PROMPTS)
    assert scores.tolist() == [0.5, 1.5, -2.0]
    assert len(seen) == 4 and waits == [0.5, 1.0, 2.0]


def test_unavailable_server_gives_up_after_the_retries():
    with scripted([(503, b'<html>\n<body>warming up</body>\n</html>')]) as (url, seen):
        with pytest.raises(RewardServerError, match=f"{url} answered HTTP 503 .*warming up.*after 3 attempts"):
            HttpReward(url, **FAST).score(images(), PROMPTS)
    assert len(seen) == 3


def test_client_error_is_not_retried():
    with scripted([(400, b'{"error": "bad request: shape"}'), (200, SCORES)]) as (url, seen):
        with pytest.raises(RewardServerError, match="answered HTTP 400 .*bad request: shape"):
            HttpReward(url, **FAST).score(images(), PROMPTS)
    assert len(seen) == 1


def test_health_check_without_a_name_is_refused():
    with scripted([(200, b'{"status": "ok"}')]) as (url, seen):
        with pytest.raises(RewardServerError, match='health check with .* which has no "name"'):
            check_reward(url)
    assert seen == ["/scorer/health"]


def test_timeout_and_retries_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("STEPZOO_REWARD_HTTP_TIMEOUT", "7.5")
    monkeypatch.setenv("STEPZOO_REWARD_HTTP_RETRIES", "0")
    client = HttpReward.from_env("http://127.0.0.1:1/scorer")
    assert (client.timeout, client.retries) == (7.5, 0)
    monkeypatch.setenv("STEPZOO_REWARD_HTTP_RETRIES", "many")
    with pytest.raises(ValueError, match="STEPZOO_REWARD_HTTP_RETRIES='many' is not a whole number"):
        check_reward("http://127.0.0.1:1/scorer")
    monkeypatch.setenv("STEPZOO_REWARD_HTTP_RETRIES", "-1")
    with pytest.raises(ValueError, match="STEPZOO_REWARD_HTTP_RETRIES='-1' is out of range"):
        check_reward("http://127.0.0.1:1/scorer")
    monkeypatch.setenv("STEPZOO_REWARD_HTTP_RETRIES", "0")
    monkeypatch.setenv("STEPZOO_REWARD_HTTP_TIMEOUT", "0")
    with pytest.raises(ValueError, match="STEPZOO_REWARD_HTTP_TIMEOUT='0' is out of range"):
        check_reward("http://127.0.0.1:1/scorer")


@pytest.mark.parametrize("spec", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/:2", "ftp://host/x"])
def test_server_url_needs_a_path(spec):
    with pytest.raises(ValueError, match="http://HOST:PORT/NAME"):
        parse_reward_spec(spec)
