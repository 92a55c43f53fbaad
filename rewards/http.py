"""A reward scored by a server: `--reward http://HOST:PORT/NAME` (or https).

The server is `python -m rewards.serve NAME` (rewards/serve.py), or anything that speaks
the same wire format, written here once for both sides:

    GET  /NAME/health  ->  200 {"name": "<the served reward>"}
    POST /NAME         <-  {"prompts": [str] * B, "shape": [B, 3, H, W], "dtype": "uint8",
                            "images": base64 of the (B, 3, H, W) uint8 array, C order}
                       ->  200 {"scores": [float] * B}
    any error          ->  4xx/5xx {"error": "<one line>"}

NAME is the served reward's `--reward` spec, percent-encoded (`urllib.parse.quote`).
Images travel as 8-bit, round(255 * x): a quarter of float32's bytes, and what every
image becomes when saved. The model-based rewards and JPEG lose nothing to it, since
they round to 8 bits first (zoo/preprocess.py, rewards/jpeg.py); a reward that reads
finer steps, such as the tiny world's pixel golds, sees them rounded.

One `score` call is one POST. Connection failures, timeouts and 5xx answers are retried
with exponential backoff (`backoff`, doubling); 4xx answers and malformed replies
(non-JSON, a wrong number of scores, non-finite scores) are not, since asking again
gets the same. Every failure is a RewardServerError naming the URL.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import time
import urllib.error
import urllib.request
from typing import NoReturn

import numpy as np
import torch

from rewards.base import Reward
from rewards.errors import RewardServerError
from zoo import strict_json

TIMEOUT_ENV = "STEPZOO_REWARD_HTTP_TIMEOUT"
RETRIES_ENV = "STEPZOO_REWARD_HTTP_RETRIES"
DEFAULT_TIMEOUT_S = 60.0
"""Seconds a request may wait on the server (urllib's timeout, per connect and per read):
a large batch on a busy GPU takes seconds, a hung server forever."""
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0
"""Wait before the first retry; each further retry waits twice as long (1, 2, 4 s)."""
SERVE_COMMAND = "python -m rewards.serve NAME --port PORT"


def encode_images(images: torch.Tensor) -> dict:
    """(B, 3, H, W) in [0, 1] -> the request's "shape", "dtype" and "images" fields."""
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    return {
        "shape": list(pixels.shape),
        "dtype": "uint8",
        "images": base64.b64encode(pixels.numpy().tobytes()).decode("ascii"),
    }


def decode_images(request: dict) -> torch.Tensor:
    """A request's images as (B, 3, H, W) float32 in [0, 1]. Raises ValueError saying
    which field is wrong."""
    shape, dtype = request.get("shape"), request.get("dtype")
    if dtype != "uint8":
        raise ValueError(f'"dtype" must be "uint8", got {dtype!r}')
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1] == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise ValueError(f'"shape" must be [B, 3, H, W] of positive integers, got {shape!r}')
    try:
        data = base64.b64decode(request.get("images", ""), validate=True)
    except (TypeError, ValueError):
        raise ValueError('"images" is not base64') from None
    if len(data) != math.prod(shape):
        raise ValueError(f'"images" holds {len(data)} bytes, but shape {shape} needs {math.prod(shape)}')
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    return torch.from_numpy(pixels.copy()).float() / 255


class HttpReward(Reward):
    """The client of one reward server; `name` is its URL, as given to `--reward`.

    `calls` counts the batches sent, like any reward's model evaluations: the server's
    model calls are this run's budget.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF_S,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(device, dtype)
        self.name = url
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    @classmethod
    def from_env(cls, url: str, **kwargs) -> "HttpReward":
        """The client with timeout and retries from STEPZOO_REWARD_HTTP_TIMEOUT and
        STEPZOO_REWARD_HTTP_RETRIES where set. Raises ValueError naming a bad variable."""
        settings = {}
        for key, variable, cast, kind in [
            ("timeout", TIMEOUT_ENV, float, "a number of seconds"),
            ("retries", RETRIES_ENV, int, "a whole number"),
        ]:
            if os.environ.get(variable):
                try:
                    settings[key] = cast(os.environ[variable])
                except ValueError:
                    raise ValueError(f"{variable}={os.environ[variable]!r} is not {kind}") from None
                if settings[key] < 0 or (key == "timeout" and settings[key] == 0):
                    raise ValueError(
                        f"{variable}={os.environ[variable]!r} is out of range: the timeout must be above 0 s, "
                        "the retries at least 0"
                    )
        return cls(url, **settings, **kwargs)

    def health(self) -> str:
        """The name of the reward the server serves; raises RewardServerError if it does
        not answer as a reward server."""
        answer = self._json(self._request(urllib.request.Request(f"{self.url}/health")))
        if not isinstance(answer.get("name"), str):
            self._fail(f"answered its health check with {answer!r}, which has no \"name\"")
        return answer["name"]

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        body = strict_json.dumps({"prompts": prompts, **encode_images(images)}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        scores = self._json(self._request(request)).get("scores")
        if not isinstance(scores, list) or len(scores) != len(prompts):
            count = f"{len(scores)} scores" if isinstance(scores, list) else f'"scores": {scores!r}'
            self._fail(f"returned {count} for {len(prompts)} images")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            self._fail(f"returned scores that are not all finite numbers: {scores[:8]!r}")
        return torch.tensor(scores, dtype=torch.float32, device=self.device)

    def _request(self, request: urllib.request.Request) -> bytes:
        """The answer's body, after up to `retries` retries of failures that may pass."""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return answer.read()
            except urllib.error.HTTPError as error:
                detail = " ".join(error.read()[:300].decode(errors="replace").split())  # one line, even from HTML
                failure = f"answered HTTP {error.code} {error.reason}: {detail}"
                if error.code < 500:
                    self._fail(failure)
            except (OSError, http.client.HTTPException) as error:  # URLError is an OSError with a reason
                failure = self._describe(getattr(error, "reason", error))
        attempts = self.retries + 1
        self._fail(f"{failure}, after {attempts} attempt{'s' if attempts > 1 else ''}")

    def _describe(self, error: object) -> str:
        if isinstance(error, ConnectionRefusedError):
            return "refused the connection"
        if isinstance(error, TimeoutError):
            return f"did not answer within {self.timeout:g} s"
        return f"failed: {type(error).__name__}: {error}"

    def _json(self, body: bytes) -> dict:
        try:
            answer = json.loads(body)
        except ValueError:
            self._fail(f"answered something that is not JSON: {body[:80]!r}")
        if not isinstance(answer, dict):
            self._fail(f"answered {answer!r:.80}, not a JSON object")
        return answer

    def _fail(self, what: str) -> NoReturn:
        raise RewardServerError(
            f"Reward server {self.name} {what}. Check --reward (a server started with `{SERVE_COMMAND}` "
            f"prints its URL); {TIMEOUT_ENV} (now {self.timeout:g} s) and {RETRIES_ENV} (now {self.retries}) "
            "set the timeout and retries."
        )
