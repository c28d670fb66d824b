"""Preemption and checkpoint integrity, with real processes and real orbax checkpoints: SIGTERM saves and
exits 0 and the resumed run equals an uninterrupted one; a damaged latest checkpoint is moved aside and
the run resumes from the one before."""

import glob
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
from tiny_flags import TINY  # pylint: disable=g-bad-import-order  (tests/ is on sys.path)


def train_command(model_dir: str) -> list[str]:
  # CHECKPOINT_PERIOD=100: the only checkpoints are the preemption's and the final one. EVAL_PERIOD=0: no eval.
  return [sys.executable, '-m', 'st_moe_jax.train', '--gin_file=gin/runs/pretrain.gin',
          '--gin_file=gin/models/st_moe_tiny.gin', '--gin_file=gin/runs/decoder_only.gin',
          '--gin.MIXTURE_OR_TASK_NAME="stdlib_lm"', "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
          '--gin.BATCH_SIZE=8', *TINY, f'--gin.MODEL_DIR="{model_dir}"', f'--gin.TRAIN_STEPS={STEPS}',
          '--gin.LOG_PERIOD=1', '--gin.EVAL_PERIOD=0', '--gin.CHECKPOINT_PERIOD=100']


# One simulated device: the fastest compile; the checkpoint and resume paths are the same.
ENV = {**os.environ, 'PYTHONPATH': REPO, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}


def params_of(model_dir: str, step: int):
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(os.path.join(model_dir, f'checkpoint_{step}', 'params'))


def checkpoints(model_dir: str) -> list[str]:
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_dir, 'checkpoint_*')))


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resume_equals_uninterrupted_run(tmp_path):
  import jax
  preempted, straight = str(tmp_path / 'preempted'), str(tmp_path / 'straight')
  # The uninterrupted run of the same command goes alongside (the test's wall time on 2 cores).
  uninterrupted = subprocess.Popen(train_command(straight), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
  process = subprocess.Popen(train_command(preempted), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.startswith('step      3/'):
      # Frozen first so that a loaded machine cannot let it run to the end before the signal lands.
      process.send_signal(signal.SIGSTOP)
      process.send_signal(signal.SIGTERM)
      process.send_signal(signal.SIGCONT)
      break
  out, err = process.communicate(timeout=120)
  lines += out.splitlines()
  assert process.returncode == 0, err[-3000:]
  said = [l for l in lines if l.startswith('Preempted (SIGTERM) at step ')]
  assert len(said) == 1, lines
  step = int(said[0].split('at step ')[1].split(':')[0])
  assert 3 <= step < STEPS, said
  assert said[0].strip() == (f'Preempted (SIGTERM) at step {step}: saved checkpoint_{step}; rerun the same '
                             'command to resume.')
  assert checkpoints(preempted) == [f'checkpoint_{step}']
  assert 'Traceback' not in err

  resumed = subprocess.run(train_command(preempted), cwd=REPO, env=ENV, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from {preempted}/checkpoint_{step}.' in resumed.stdout
  _, err = uninterrupted.communicate(timeout=120)
  assert uninterrupted.returncode == 0, err[-3000:]
  jax.tree.map(np.testing.assert_array_equal, params_of(straight, STEPS), params_of(preempted, STEPS))


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  """A truncated chunk file, then a deleted params/_METADATA: each time checkpoint_2 is named, moved aside
  and the run resumes from checkpoint_1; with nothing intact the run stops with a clear error."""
  import shutil
  from st_moe_jax import trainer
  from tests import test_checkpoint_manager as tcm
  from tests import test_trainer as tt
  trained = str(tmp_path / 'trained')
  tr = tt.make_trainer()
  trainer.fit(tr, trained, tt.make_data(),
              trainer.LoopConfig(2, tt.BATCH, log_period=100, eval_period=1000, checkpoint_period=1),
              print_fn=lambda _: None)
  assert checkpoints(trained) == ['checkpoint_1', 'checkpoint_2']
  # TRAIN_STEPS=1: the resumed run stops at checkpoint_1 (restore only, no compilation).
  loop = trainer.LoopConfig(1, tt.BATCH, log_period=100, eval_period=1000, checkpoint_period=1)
  for damage in ('truncated_chunk', 'deleted_metadata'):
    model_dir = str(tmp_path / damage)
    shutil.copytree(trained, model_dir)
    params_dir = os.path.join(model_dir, 'checkpoint_2', 'params')
    if damage == 'truncated_chunk':
      path = tcm.largest_data_file(params_dir)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    else:
      os.remove(os.path.join(params_dir, '_METADATA'))
    lines = []
    trainer.fit(tr, model_dir, tt.make_data(), loop, print_fn=lines.append)
    warning = [l for l in lines if l.startswith('WARNING: checkpoint_2 is corrupt: ')]
    assert len(warning) == 1 and len(warning[0].splitlines()) == 1, lines
    assert ('_METADATA is missing' if damage == 'deleted_metadata' else 'OCDBT') in warning[0]
    assert f'Resumed from {model_dir}/checkpoint_1.' in lines
    aside = [n for n in os.listdir(model_dir) if n.startswith('checkpoint_2.corrupt-')]
    assert len(aside) == 1 and f'moved it to {aside[0]}' in warning[0]
    assert checkpoints(model_dir) == ['checkpoint_1'] + aside

  # Nothing intact: a clear error, and every damaged checkpoint is kept (moved aside, never deleted).
  os.remove(os.path.join(model_dir, 'checkpoint_1', 'params', '_METADATA'))
  with pytest.raises(trainer.ckpt_lib.CheckpointCorruptError, match='No intact checkpoint to resume from'):
    trainer.fit(tr, model_dir, tt.make_data(), loop, print_fn=lambda _: None)
  assert len([n for n in os.listdir(model_dir) if '.corrupt-' in n]) == 2
