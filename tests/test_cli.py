"""Entry points: t5x-style flags, clear errors for bad input (no stack traces), a tiny train + eval run."""

import json
import os
import subprocess
import sys

import pytest

from st_moe_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--gin.EMBED_DIM=32', '--gin.MLP_DIM=48', '--gin.NUM_HEADS=2', '--gin.HEAD_DIM=16',
        '--gin.NUM_EXPERTS=4', '--gin.EXPERT_MLP_DIM=32', '--gin.GROUP_SIZE=64']
LM = ['--gin_file=gin/models/st_moe_tiny.gin', '--gin_file=gin/runs/decoder_only.gin',
      '--gin.MIXTURE_OR_TASK_NAME="stdlib_lm"', "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
      '--gin.BATCH_SIZE=8', *TINY]


def pretrain_args(model_dir, *extra):
  return ['--gin_file=gin/runs/pretrain.gin', *LM, f'--gin.MODEL_DIR="{model_dir}"', '--gin.TRAIN_STEPS=2',
          '--gin.LOG_PERIOD=1', '--gin.EVAL_PERIOD=2', '--gin.EVAL_STEPS=1', '--gin.CHECKPOINT_PERIOD=2',
          *extra]


def test_rewrite_gin_args():
  assert cli.rewrite_gin_args(['--gin.MODEL_DIR="x"', '--gin_file=a.gin']) == [
      '--gin_bindings=MODEL_DIR = "x"', '--gin_file=a.gin']


def test_unknown_task(tmp_path, cli_error):
  err = cli_error(pretrain_args(tmp_path, '--gin.MIXTURE_OR_TASK_NAME="stdlib_lmm"'))
  assert "Unknown task or mixture 'stdlib_lmm'" in err and 'stdlib_lm' in err


def test_missing_model_dir(cli_error):
  argv = [a for a in pretrain_args('x') if not a.startswith('--gin.MODEL_DIR')]
  err = cli_error(argv)
  assert 'MODEL_DIR' in err


def test_misspelt_macro(tmp_path, cli_error):
  err = cli_error(pretrain_args(tmp_path, '--gin.TRAIN_STEP=3'))
  assert "Unknown gin macro 'TRAIN_STEP'" in err and 'TRAIN_STEPS' in err


def test_misspelt_parameter_shows_gin_message_and_file(tmp_path, cli_error):
  bad = tmp_path / 'bad.gin'
  bad.write_text('train_script.train.eval_perod = 10\n')
  err = cli_error(pretrain_args(tmp_path, f'--gin_file={bad}'))
  assert 'eval_perod' in err and 'bad.gin' in err


def test_batch_not_divisible_by_mesh(tmp_path, cli_error):
  # 8 simulated devices, NUM_EXPERT_PARTITIONS = NUM_EXPERTS = 4: mesh (data 2, expert 4, model 1).
  err = cli_error(pretrain_args(tmp_path, '--gin.BATCH_SIZE=12'))
  assert 'BATCH_SIZE=12 is not divisible' in err and 'NUM_EXPERT_PARTITIONS' in err


def test_experts_not_divisible_by_partitions(tmp_path, cli_error):
  err = cli_error(pretrain_args(tmp_path, '--gin.NUM_EXPERT_PARTITIONS=3'))
  assert 'NUM_EXPERTS=4 is not divisible by NUM_EXPERT_PARTITIONS=3' in err


def test_finished_run_builds_no_data_pipeline(tmp_path, monkeypatch, capsys):
  """MODEL_DIR already at TRAIN_STEPS: the run stops before reading data (the unknown task is not looked up)."""
  from st_moe_jax import train
  (tmp_path / 'checkpoint_2').mkdir()
  monkeypatch.chdir(REPO)
  train.main(pretrain_args(tmp_path, '--gin.MIXTURE_OR_TASK_NAME="no_such_task"'))
  assert 'is already at step 2 >= TRAIN_STEPS=2' in capsys.readouterr().out


def run_cli(module, argv):
  env = {**os.environ, 'PYTHONPATH': REPO}
  return subprocess.run([sys.executable, '-m', module, *argv], cwd=REPO, env=env, capture_output=True,
                        text=True)


@pytest.mark.slow
def test_tiny_train_then_evaluate_then_other_shape(tmp_path):
  model_dir = str(tmp_path / 'run')
  result = run_cli('st_moe_jax.train', pretrain_args(model_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step      2/2' in result.stdout and 'tokens/s' in result.stdout
  for name in ('checkpoint_2', 'config.gin', 'model-info.txt', 'train', 'training_eval'):
    assert os.path.exists(os.path.join(model_dir, name)), name
  assert 'train.train_steps = %TRAIN_STEPS' in open(os.path.join(model_dir, 'config.gin')).read()

  eval_args = ['--gin_file=gin/runs/eval.gin', *LM, f'--gin.CHECKPOINT_PATH="{model_dir}"',
               f'--gin.EVAL_OUTPUT_DIR="{model_dir}/eval"', '--gin.EVAL_STEPS=2']
  result = run_cli('st_moe_jax.evaluate', eval_args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'bits/byte' in result.stdout and 'expert usage' in result.stdout
  with open(os.path.join(model_dir, 'eval', 'stdlib_lm-metrics.jsonl')) as f:
    metrics = json.loads(f.readline())
  assert metrics['step'] == 2 and metrics['bits_per_byte'] > 0

  result = run_cli('st_moe_jax.evaluate', eval_args + ['--gin.NUM_EXPERTS=2'])
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'another shape' in result.stderr or 'does not fit' in result.stderr
  assert 'checkpoint (4,' in result.stderr  # e.g. expert kernels: checkpoint (4, 32, 32) vs model (2, ...)
