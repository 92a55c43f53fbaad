"""Run under 2 processes: the benchmark runner with a fault in epoch 2 on one process
only; both processes must stop with the run's own error, not wait on each other.

    fault_on_one_process.py nan-loss ARGS...      DDPO's loss turns NaN on process 1
    fault_on_one_process.py write-fails ARGS...   the main process cannot write its checkpoint
"""

import math
import sys

import benchmarks.train
from benchmarks.checkpoint import WriteFailed
from benchmarks.run import main

real_train_epoch = benchmarks.train.train_on_batch
real_save_state = benchmarks.train.save_state
epochs_trained = []


def nan_loss_on_process_1_from_epoch_2(algorithm, config, sampler, traj, advantages, optimizer, accelerator, *rest):
    epochs_trained.append(1)
    if len(epochs_trained) == 2 and accelerator.process_index == 1:
        real_loss = algorithm.loss

        def nan_loss(inputs):
            loss, metrics = real_loss(inputs)
            return loss * math.nan, metrics

        algorithm.loss = nan_loss
    return real_train_epoch(algorithm, config, sampler, traj, advantages, optimizer, accelerator, *rest)


def disk_full_from_epoch_2(path, state):
    if state.get("epoch", 0) >= 2:
        raise WriteFailed(f"cannot write {path}: No space left on device")
    real_save_state(path, state)


if __name__ == "__main__":
    mode, *argv = sys.argv[1:]
    if mode == "nan-loss":
        benchmarks.train.train_on_batch = nan_loss_on_process_1_from_epoch_2
    else:
        benchmarks.train.save_state = disk_full_from_epoch_2
    sys.exit(main(argv))
