"""`python -m rewards.serve NAME --port PORT [--host 127.0.0.1]`: serve one reward over HTTP.

NAME is any `--reward` spec (a registered name, a plugin `module.path:ClassName`, a
weighted sum), loaded with `load_reward` as the benchmark would. The server prints the
URL to give a run, `--reward http://HOST:PORT/NAME`, and speaks the wire format that
rewards/http.py documents:

    GET  /NAME/health  ->  {"name": NAME}
    POST /NAME         <-  {"prompts": [...], "shape": [B, 3, H, W], "dtype": "uint8",
                            "images": base64 of the uint8 bytes}
                       ->  {"scores": [...]}

Use it to keep a large reward model on its own GPU or machine, or in its own Python
environment. Requests are served in threads so that a health check answers during a
long batch, but batches are scored one at a time: the reward holds one model.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import torch

from rewards.base import Reward
from rewards.errors import RewardUnavailable
from rewards.http import decode_images
from rewards.registry import load_reward
from rewards.spec import parse_reward_paths
from zoo import strict_json


def route(reward: Reward) -> str:
    """The URL path a reward is served at: its name, percent-encoded."""
    return "/" + quote(reward.name, safe="")


def parse_request(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """A scoring request's images (B, 3, H, W) in [0, 1] and B prompts. Raises ValueError
    saying what is wrong, which the client receives with status 400."""
    request = json.loads(body)
    if not isinstance(request, dict):
        raise ValueError("the body must be a JSON object")
    images, prompts = decode_images(request), request.get("prompts")
    if not (isinstance(prompts, list) and all(isinstance(prompt, str) for prompt in prompts)):
        raise ValueError('"prompts" must be a list of strings')
    if len(prompts) != images.shape[0]:
        raise ValueError(f'{images.shape[0]} images but {len(prompts)} "prompts"')
    return images, prompts


def make_server(reward: Reward, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server for `reward`, bound but not yet serving (call `serve_forever`); port 0
    picks a free port, in `server.server_address`."""
    path = route(reward)
    scoring = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == f"{path}/health":
                self._answer(200, {"name": reward.name})
            else:
                self._not_here()

        def do_POST(self) -> None:
            if self.path != path:
                self._not_here()
                return
            try:
                images, prompts = parse_request(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            except ValueError as error:
                self._answer(400, {"error": f"bad request: {error}"})
                return
            try:
                with scoring:
                    scores = reward.score(images.to(reward.device), prompts)
            except Exception as error:  # the server outlives a failing batch; the client reports it
                self._answer(500, {"error": f"{reward.name} failed: {type(error).__name__}: {error}"})
                return
            self._answer(200, {"scores": scores.cpu().tolist()})

        def _not_here(self) -> None:
            self._answer(404, {"error": f"nothing at {self.path}; this server serves {path} (health: {path}/health)"})

        def _answer(self, status: int, body: dict) -> None:
            data = strict_json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards.serve", description=__doc__.splitlines()[0])
    parser.add_argument("reward", help="a --reward spec: a registered name, module.path:ClassName, or a weighted sum")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves other machines")
    parser.add_argument("--device", default=None, help="where the reward runs (default: cuda if available, else cpu)")
    parser.add_argument("--reward-path", action="append", default=[], metavar="NAME[:ROLE]=PATH")
    args = parser.parse_args(argv)
    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        reward = load_reward(args.reward, device=device, paths=parse_reward_paths(args.reward_path))
    except (RewardUnavailable, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    server = make_server(reward, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {reward.name} on {device}: --reward http://{host}:{port}{route(reward)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
