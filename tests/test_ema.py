"""The EMA of the trained LoRA weights (benchmarks/ema.py): flow_grpo's update worked by
hand, then micro runs of DDPO (one optimizer update per epoch, two epochs): off, the run is
what it was; evaluated, the evaluations and lora/ see the EMA while training goes on from
the trained weights; a run killed in its second epoch resumes to the same records and EMA."""

import copy
import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import benchmarks.train
import zoo.policy
from benchmarks.checkpoint import load_state
from benchmarks.ema import Ema, WeightsEma
from benchmarks.run import main

from helpers.runs import micro_args

EMA_ON = ["--ema.decay", "0.9", "--ema.update-interval", "1"]
"""Flow-GRPO's decay, moved after every update: the micro run's two updates both move it."""
WHERE = "ddpo seed 0, epoch {}"
"""How the loop names an evaluation of the micro run's DDPO (`evaluate`'s `where`)."""


def _scalar_ema(settings: Ema, values: list[float], start: float = 0.0) -> list[float]:
    """The EMA after each of the updates that leave a scalar parameter at `values` in turn."""
    param = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    ema = WeightsEma(settings, {"w": param})
    seen = []
    for value in values:
        with torch.no_grad():
            param.fill_(value)
        ema.update()
        seen.append(float(ema.weights["w"]))
    return seen


def test_ema_update_by_hand_as_flow_grpo():
    """flow_grpo/ema.py (ac4c86e): after update n, a move when (n + 1) % 8 == 0, by
    e <- e + (1 - d_n)(w - e) with d_n = min((1 + n)/(10 + n), 0.9).

    A parameter at 0 set to n by update n: updates 1..6 leave e = 0; update 7 moves with
    d_7 = 8/17: e = (9/17)·7 = 63/17; 8..14 nothing; update 15 with d_15 = 16/25:
    e = 63/17 + (9/25)(15 - 63/17) = 63/17 + (9/25)(192/17) = 3303/425; 16 nothing.
    """
    seen = _scalar_ema(Ema(decay=0.9, update_interval=8), [float(n) for n in range(1, 17)])
    expected = [0.0] * 6 + [63 / 17] * 8 + [3303 / 425] * 2
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)


def test_ema_decay_warms_up_then_holds():
    """d_n = min((1 + n)/(10 + n), decay): 80/89 after update 79, 81/90 = 0.9 after 80, and
    0.9 from then on (82/91 > 0.9). With decay 0.5 and a move after every update towards a
    weight held at 1 from e = 0: 1 - e_n = d_1 d_2 ... d_n; d_1..d_3 = 2/11, 3/12, 4/13 give
    1 - 2/143 after 3 updates; the warm-up passes 0.5 at n = 9 (10/19), so d_8 = 9/18 = 0.5
    and d_9 = 0.5: 1 - e_9 = (2·3·4·5·6·7·8·9/(11·12·13·14·15·16·17·18))·0.5.
    """
    flow_grpo = Ema(decay=0.9)
    assert [flow_grpo.decay_after(n) for n in (1, 79, 80, 81, 1000)] == pytest.approx(
        [2 / 11, 80 / 89, 0.9, 0.9, 0.9], rel=1e-15)
    assert [n for n in range(1, 33) if flow_grpo.moves_after(n)] == [7, 15, 23, 31]
    seen = _scalar_ema(Ema(decay=0.5, update_interval=1), [1.0] * 9)
    remaining = Fraction(2 * 3 * 4 * 5 * 6 * 7 * 8 * 9, 11 * 12 * 13 * 14 * 15 * 16 * 17 * 18) / 2
    assert seen[2] == pytest.approx(1 - 2 / 143, rel=1e-12)
    assert seen[8] == pytest.approx(1 - float(remaining), rel=1e-12)


def test_ema_state_round_trip_continues_the_count():
    """A restored EMA (`state_dict` into a new one) moves as the original would: the same
    weights and the same update count, so the same warmed-up decay."""
    settings = Ema(decay=0.9, update_interval=2)
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    ema = WeightsEma(settings, {"w": param})
    for value in (3.0, 5.0, 7.0):
        with torch.no_grad():
            param.fill_(value)
        ema.update()
    restored = WeightsEma(settings, {"w": param}, ema.state_dict())
    assert restored.updates == 3
    for copy in (ema, restored):
        with torch.no_grad():
            param.fill_(11.0)
        copy.update()
    # Moves after updates 1 (d = 2/11) and 3 (d = 4/13): e = [1, -2] -> 2/11·e + 9/11·3 ->
    # 4/13·e + 9/13·7; update 4 does not move.
    first = [2 / 11 * 1 + 9 / 11 * 3, 2 / 11 * -2 + 9 / 11 * 3]
    expected = torch.tensor([4 / 13 * e + 9 / 13 * 7 for e in first], dtype=torch.float64)
    torch.testing.assert_close(ema.weights["w"], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(restored.weights["w"], expected, rtol=1e-12, atol=0)


class Run:
    """What a micro run showed: the trainable weights each evaluation saw (by `where`), every
    checkpoint written (by epoch), the weights written to lora/, the records."""

    def __init__(self, out: Path, algo: str = "ddpo"):
        self.out, self.algo = out, algo
        self.evaluated: dict[str, dict[str, torch.Tensor]] = {}
        self.checkpoints: dict[int, dict] = {}
        self.saved_lora: dict[str, torch.Tensor] | None = None

    @property
    def records(self) -> list[dict]:
        rows = [json.loads(line) for line in (self.out / "records.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]

    def lora_file(self) -> dict[str, torch.Tensor]:
        return load_file(self.out / "lora" / f"{self.algo}_seed0" / "pytorch_lora_weights.safetensors")


class Interrupted(Exception):
    """Stands in for the SIGKILL of `kill_point` (tests/test_reliability_kill.py kills for real)."""


def _micro_run(model: str, out: Path, extra: list[str], kill_at: str | None = None, run: Run | None = None,
               algo: str = "ddpo") -> Run:
    """Run the micro command with `extra` for `algo`, watching evaluations, checkpoints and
    lora/; with `kill_at`, the run stops at that kill point as a killed process would."""
    run = run or Run(out, algo)
    real_evaluate, real_save = benchmarks.train.evaluate, benchmarks.train.save_state
    real_kill = benchmarks.train.kill_point
    real_save_lora = zoo.policy.Policy.save_lora

    def evaluate(policy, rewards, evaluation, accelerator, where):
        run.evaluated[where] = {k: v.cpu() for k, v in policy.trainable_state().items()}
        return real_evaluate(policy, rewards, evaluation, accelerator, where=where)

    def save_state(path, state):
        if Path(path).name == f"{run.algo}_seed0.pt":
            run.checkpoints[state["epoch"]] = copy.deepcopy(state)  # as written: later epochs move the EMA in place
        real_save(path, state)

    def kill_point(name):
        if name == kill_at:
            raise Interrupted(name)
        real_kill(name)

    def save_lora(policy, folder):
        run.saved_lora = {k: v.cpu() for k, v in policy.trainable_state().items()}
        return real_save_lora(policy, folder)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(benchmarks.train, "evaluate", evaluate)
        patch.setattr(benchmarks.train, "save_state", save_state)
        patch.setattr(benchmarks.train, "kill_point", kill_point)
        patch.setattr(zoo.policy.Policy, "save_lora", save_lora)
        assert main(micro_args(model, out) + ["--algos", run.algo] + extra) == 0
    return run


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir, tmp_path_factory) -> dict[str, Run]:
    """The micro run without an EMA, with one kept but not evaluated, and with one evaluated."""
    root = tmp_path_factory.mktemp("ema")
    return {
        "off": _micro_run(tiny_pipeline_dir, root / "off", []),
        "kept": _micro_run(tiny_pipeline_dir, root / "kept", EMA_ON + ["--ema.no-evaluate"]),
        "evaluated": _micro_run(tiny_pipeline_dir, root / "evaluated", EMA_ON),
    }


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_ema_not_evaluated_changes_nothing_and_off_writes_none(runs):
    """Keeping an EMA moves neither the training nor what is reported: the records, every
    checkpoint's LoRA and lora/ equal the run without one, whose checkpoints hold no EMA and
    whose config.json records none. (With --ema.decay left out the loop's only new steps
    are `ema is None` tests, so the records equal the code's before the EMA.)"""
    off, kept = runs["off"], runs["kept"]
    assert off.records == kept.records
    for epoch in (1, 2):
        assert _equal(off.checkpoints[epoch]["lora"], kept.checkpoints[epoch]["lora"])
        assert "ema" not in off.checkpoints[epoch]
        assert kept.checkpoints[epoch]["ema"]["updates"] == epoch
    assert _equal(off.lora_file(), kept.lora_file())
    assert json.loads((off.out / "config.json").read_text())["ema"] is None
    assert json.loads((kept.out / "config.json").read_text())["ema"] == {
        "decay": 0.9, "update_interval": 1, "evaluate": False,
    }
    # Kept, not evaluated: every evaluation and lora/ saw the trained weights, not the EMA.
    final = kept.checkpoints[2]["ema"]["weights"]
    assert _equal(kept.saved_lora, kept.evaluated[WHERE.format(2)])
    assert not _equal(kept.saved_lora, final)


def test_evaluations_see_the_ema_and_training_goes_on_from_the_trained_weights(runs):
    """Evaluated: each evaluation (epochs 1 and 2) saw exactly the EMA its checkpoint holds,
    lora/ holds the last one, and the trained weights (each checkpoint's LoRA, the weights
    the run without evaluation saw) are those of the run whose EMA was not evaluated.

    The loop's moves, worked from the trained weights w_n the other run evaluated, with
    decay 0.9 and a move after every update: d_1 = 2/11, d_2 = 3/12. LoRA B starts at 0
    (peft's gaussian init), so after update 1 the EMA of every B is (9/11)·w_1; after
    update 2 every EMA is (3/12)·e_1 + (9/12)·w_2.
    """
    evaluated, kept = runs["evaluated"], runs["kept"]
    for epoch in (1, 2):
        ema = evaluated.checkpoints[epoch]["ema"]
        assert ema["updates"] == epoch
        assert _equal(evaluated.evaluated[WHERE.format(epoch)], ema["weights"])
        assert _equal(evaluated.checkpoints[epoch]["lora"], kept.checkpoints[epoch]["lora"])
        assert _equal(ema["weights"], kept.checkpoints[epoch]["ema"]["weights"])
        assert not _equal(ema["weights"], kept.evaluated[WHERE.format(epoch)])
    assert _equal(evaluated.saved_lora, evaluated.checkpoints[2]["ema"]["weights"])
    assert not _equal(evaluated.lora_file(), kept.lora_file())
    base = [r for r in evaluated.records if r["algo"] == "base"]
    assert base == [r for r in kept.records if r["algo"] == "base"]
    assert evaluated.records != kept.records

    trained = {epoch: kept.evaluated[WHERE.format(epoch)] for epoch in (1, 2)}
    first, second = (evaluated.checkpoints[epoch]["ema"]["weights"] for epoch in (1, 2))
    b_keys = [k for k in first if ".lora_B." in k]
    assert b_keys
    for k in b_keys:
        torch.testing.assert_close(first[k], trained[1][k] * (9 / 11), rtol=1e-6, atol=1e-9)
    for k in first:
        expected = first[k].double() * (3 / 12) + trained[2][k].double() * (9 / 12)
        torch.testing.assert_close(second[k].double(), expected, rtol=1e-6, atol=1e-7)


def test_killed_in_epoch_two_then_resumed_equals_the_uninterrupted_run(runs, tiny_pipeline_dir, tmp_path):
    """Stopped where `STEPZOO_KILL_AT=train:ddpo:2` kills (its epoch-1 checkpoint, EMA
    included, on disk), then `--resume`: the same records, the same EMA (weights and update
    count) and the same lora/ as the run that was never stopped."""
    out = tmp_path / "run"
    run = Run(out)
    with pytest.raises(Interrupted):
        _micro_run(tiny_pipeline_dir, out, EMA_ON, kill_at="train:ddpo:2", run=run)
    assert load_state(out / "checkpoints" / "ddpo_seed0.pt")["ema"]["updates"] == 1
    _micro_run(tiny_pipeline_dir, out, EMA_ON + ["--resume"], run=run)
    straight = runs["evaluated"]
    assert run.records == straight.records
    resumed_ema, straight_ema = (r.checkpoints[2]["ema"] for r in (run, straight))
    assert resumed_ema["updates"] == straight_ema["updates"] == 2
    assert _equal(resumed_ema["weights"], straight_ema["weights"])
    assert _equal(run.lora_file(), straight.lora_file())


def test_resume_keeps_the_recorded_ema(runs, tiny_pipeline_dir, tmp_path, capsys):
    """A resume with other EMA settings is refused, naming them; a run recorded before the
    EMA existed (config.json without "ema") resumes as a run without one. EMA flags without
    --ema.decay, a decay outside [0, 1] and an interval below 1 are refused."""
    evaluated = tmp_path / "evaluated"
    shutil.copytree(runs["evaluated"].out, evaluated)
    for other in (["--ema.decay", "0.8", "--ema.update-interval", "1"], ["--ema.decay", "0.9"], []):
        assert main(micro_args(tiny_pipeline_dir, evaluated) + ["--algos", "ddpo"] + other + ["--resume"]) == 2
        assert "other settings (--ema" in capsys.readouterr().err
    older = tmp_path / "older"
    shutil.copytree(runs["off"].out, older)
    config = json.loads((older / "config.json").read_text())
    del config["ema"]
    (older / "config.json").write_text(json.dumps(config))
    assert main(micro_args(tiny_pipeline_dir, older) + ["--algos", "ddpo"] + ["--resume"]) == 0
    for flags, said in [(["--ema.no-evaluate"], "--ema.no-evaluate: no EMA is kept without --ema.decay"),
                        (["--ema.decay", "1.5"], "--ema.decay must be between 0 and 1"),
                        (["--ema.decay", "0.9", "--ema.update-interval", "0"],
                         "--ema.update-interval must be at least 1")]:
        assert main(micro_args(tiny_pipeline_dir, tmp_path / "new") + ["--algos", "ddpo"] + flags) == 2
        assert said in capsys.readouterr().err


def test_reward_backpropagation_moves_the_ema_after_each_of_its_updates(tiny_pipeline_dir, tmp_path):
    """DRaFT trains in its own epoch function (`reward_backprop_epoch`): its EMA counts every
    optimizer update the records count, and moved from the start (LoRA B = 0) to non-zero B."""
    run = _micro_run(tiny_pipeline_dir, tmp_path / "draft", EMA_ON + ["--reward", "tiny-clip"], algo="draft")
    final = run.checkpoints[2]
    assert final["ema"]["updates"] == final["counters"]["optimizer_updates"] > 0
    assert _equal(run.evaluated["draft seed 0, epoch 2"], final["ema"]["weights"])
    assert any(w.abs().sum() > 0 for k, w in final["ema"]["weights"].items() if ".lora_B." in k)
