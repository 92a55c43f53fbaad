"""Code that several test files share: the stand-ins (doubles) for rewards, algorithms,
samplers and optimizers, the policies and run flags the tests build on, and one check.
No test file imports another; what two of them need lives here, each module named for
what it holds:

- `helpers.rewards`: rewards that stand in for a reward model (`Brightness`,
  `DistanceToTarget`).
- `helpers.policies`: the tiny policy with a random adapter, and the check that a
  sampler's stored log-probs are re-scored exactly.
- `helpers.training`: stand-ins for what the training loop calls: the coded trajectory
  and its sampler, the recording wrappers of each algorithm kind, recording and counting
  optimizers, one transition's loss inputs.
- `helpers.runs`: the flags of the runner's micro run.
- `helpers.servers`: an HTTP server on a thread.

Importable as `helpers` because tests/ is on sys.path: pytest's default (prepend) import
mode puts the folder of the test files, which has no __init__.py, first; the scripts in
tests/distributed, which run in their own processes, put it there themselves.
"""
