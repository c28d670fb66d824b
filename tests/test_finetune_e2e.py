"""SuperGLUE fine-tuning end to end: pretrain a tiny encoder-decoder, fine-tune it on the BoolQ and CB
fixtures (SUPERGLUE_DIR=tests/data/superglue), evaluate (t5x inference_eval layout), write leaderboard
files; and the message for missing SuperGLUE data."""

import json
import os
import subprocess
import sys

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'data', 'superglue')
MIXTURE = 'e2e_boolq_cb'
TASKS = ('super_glue_boolq_v102', 'super_glue_cb_v102')
# Tiny dims (compile fast on 2 CPU cores); 8 simulated devices → mesh data 2 x expert 4, batch 8.
MODEL = ['--gin_file=gin/models/st_moe_tiny.gin', '--gin.EMBED_DIM=32', '--gin.MLP_DIM=48',
         '--gin.NUM_HEADS=2', '--gin.HEAD_DIM=16', '--gin.NUM_EXPERTS=4', '--gin.EXPERT_MLP_DIM=32',
         '--gin.GROUP_SIZE=64', '--gin.BATCH_SIZE=8']
# Byte vocabulary: "contradiction" + EOS is 14 targets.
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 96, 'targets': 16}"
LABELS = {'BoolQ.jsonl': {'true', 'false'}, 'CB.jsonl': {'entailment', 'contradiction', 'neutral'}}

# One xdist worker runs them all, so that the module fixture's runs happen once (run_tests.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group('finetune_e2e')


def run_cli(module, argv, tmp_path, superglue_dir=FIXTURES):
  # The mixture lives in a user module imported by a gin file (the t5x convention for own tasks).
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([REPO, str(tmp_path)]), 'SUPERGLUE_DIR': superglue_dir}
  result = subprocess.run([sys.executable, '-m', module, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """One pretraining run, one fine-tuning run from it; {'root', 'pretrain', 'finetune', 'mixture_gin'}."""
  root = tmp_path_factory.mktemp('e2e')
  (root / 'e2e_tasks.py').write_text(
      'import seqio\nimport tasks.superglue\n'
      f'seqio.MixtureRegistry.add({MIXTURE!r}, [(name, 1.0) for name in {TASKS!r}])\n')
  mixture_gin = root / 'e2e_tasks.gin'
  mixture_gin.write_text('import e2e_tasks\n')
  pretrain, finetune = str(root / 'pretrain'), str(root / 'finetune')
  run_cli('st_moe_jax.train', [
      '--gin_file=gin/runs/pretrain.gin', *MODEL, '--gin.MIXTURE_OR_TASK_NAME="stdlib_span_corruption"',
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", f'--gin.MODEL_DIR="{pretrain}"',
      '--gin.TRAIN_STEPS=2', '--gin.EVAL_PERIOD=0', '--gin.CHECKPOINT_PERIOD=2'], root)
  # The recipe preset, fine-tuning the non-MoE parameters only (experts and routers frozen).
  result = run_cli('st_moe_jax.train', [
      *MODEL[:1], '--gin_file=gin/runs/finetune_stmoe_recipe.gin', f'--gin_file={mixture_gin}', *MODEL[1:],
      f'--gin.MIXTURE_OR_TASK_NAME="{MIXTURE}"', LENGTHS, f'--gin.MODEL_DIR="{finetune}"',
      f'--gin.INITIAL_CHECKPOINT_PATH="{pretrain}"', '--gin.TRAIN_STEPS=4', '--gin.EVAL_PERIOD=0',
      '--gin.CHECKPOINT_PERIOD=4', '--gin.LOG_PERIOD=1',
      """--gin.FREEZE_PATTERNS=['(^|/)expert/', '(^|/)router/']"""], root)
  assert 'Fine-tuning from' in result.stdout and 'step      4/4' in result.stdout, result.stdout[-2000:]
  return {'root': root, 'pretrain': pretrain, 'finetune': finetune, 'mixture_gin': str(mixture_gin)}


@pytest.mark.slow
def test_finetune_config(runs):
  config = open(os.path.join(runs['finetune'], 'config.gin')).read()
  assert 'expert_dropout_rate = 0.1' in config or 'EXPERT_DROPOUT_RATE = 0.1' in config
  assert os.path.isdir(os.path.join(runs['finetune'], 'checkpoint_4'))


@pytest.mark.slow
def test_evaluate_writes_t5x_inference_eval(runs):
  out = os.path.join(runs['root'], 'eval')
  result = run_cli('st_moe_jax.evaluate', [
      '--gin_file=gin/runs/eval.gin', *MODEL, f'--gin_file={runs["mixture_gin"]}',
      f'--gin.MIXTURE_OR_TASK_NAME="{MIXTURE}"', LENGTHS, f'--gin.CHECKPOINT_PATH="{runs["finetune"]}"',
      f'--gin.EVAL_OUTPUT_DIR="{out}"'], runs['root'])
  expected = {'super_glue_boolq_v102': {'accuracy'}, 'super_glue_cb_v102': {'accuracy', 'mean_3class_f1'}}
  for task, keys in expected.items():
    directory = os.path.join(out, 'inference_eval')
    with open(os.path.join(directory, f'{task}-metrics.jsonl')) as f:
      metrics = json.loads(f.readline())
    assert metrics['step'] == 4 and keys <= set(metrics), metrics
    assert all(0.0 <= metrics[k] <= 100.0 for k in keys), metrics
    with open(os.path.join(directory, f'{task}-000004.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    assert len(rows) == 2  # two validation fixtures per task
    assert {'inputs', 'targets', 'prediction'} <= set(rows[0])
    assert rows[0]['inputs'].startswith(task.split('_')[2] + ' ')
    events = os.listdir(os.path.join(directory, task))
    assert any(name.startswith('events.out.tfevents') for name in events)
    assert task in result.stdout
  assert os.path.exists(os.path.join(out, 'super_glue_cb_v102-metrics.jsonl'))  # teacher-forced


@pytest.mark.slow
def test_infer_writes_submission_files(runs):
  out = os.path.join(runs['root'], 'infer')
  run_cli('st_moe_jax.infer', [
      '--gin_file=gin/runs/infer.gin', *MODEL, f'--gin_file={runs["mixture_gin"]}',
      f'--gin.MIXTURE_OR_TASK_NAME="{MIXTURE}"', LENGTHS, f'--gin.CHECKPOINT_PATH="{runs["finetune"]}"',
      f'--gin.INFER_OUTPUT_DIR="{out}"', '--gin.INFER_SPLIT="test"'], runs['root'])
  for name, task in zip(LABELS, TASKS):
    test_rows = open(os.path.join(FIXTURES, name[:-len('.jsonl')], 'test.jsonl')).read().splitlines()
    with open(os.path.join(out, name)) as f:
      records = [json.loads(line) for line in f]
    assert len(records) == len(test_rows)
    assert [r['idx'] for r in records] == [json.loads(row)['idx'] for row in test_rows]
    assert all(r['label'] in LABELS[name] for r in records), records
    predictions = os.path.join(out, f'{task}-predict.jsonl-00000-of-00001')
    assert os.path.exists(predictions + '.COMPLETED')
    assert len(open(predictions).read().splitlines()) == len(test_rows)


@pytest.mark.parametrize('layout', ['empty', 'absent'])
def test_missing_superglue_data_says_how_to_get_it(tmp_path, monkeypatch, cli_error, layout):
  root = tmp_path / 'superglue'
  if layout == 'empty':
    root.mkdir()
  monkeypatch.setenv('SUPERGLUE_DIR', str(root))
  err = cli_error(['--gin_file=gin/runs/pretrain.gin', *MODEL, '--gin.MIXTURE_OR_TASK_NAME="super_glue_cb_v102"',
                   LENGTHS, f'--gin.MODEL_DIR="{tmp_path / "run"}"', '--gin.TRAIN_STEPS=1'])
  assert 'SUPERGLUE_DIR' in err and 'CB.zip' in err and "tfds.builder('super_glue/cb:1.0.2')" in err
