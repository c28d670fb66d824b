"""The README's train / evaluate / infer commands run as written (only the step counts are cut down and
runs/tiny is moved to a temporary folder), and show their progress lines."""

import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[list[str]]:
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read()
  section = text.split('## Training, evaluation, inference', 1)[1]
  block = section.split('```bash', 1)[1].split('```', 1)[0]
  lines = block.replace('\\\n', ' ').strip().splitlines()
  return [shlex.split(line) for line in lines if line.strip()]


def test_readme_has_the_three_commands_without_placeholders():
  commands = readme_commands()
  assert [c[2] for c in commands] == ['st_moe_jax.train', 'st_moe_jax.evaluate', 'st_moe_jax.infer']
  assert not any('...' in arg for c in commands for arg in c)


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
  run_dir = str(tmp_path / 'tiny')
  fewer = {'st_moe_jax.train': ['--gin.TRAIN_STEPS=3', '--gin.EVAL_STEPS=2'],
           'st_moe_jax.evaluate': ['--gin.EVAL_STEPS=2'], 'st_moe_jax.infer': ['--gin.MAX_BATCHES=1']}
  env = {**os.environ, 'PYTHONPATH': REPO}
  outputs = {}
  for command in readme_commands():
    assert command[0] == '.venv/bin/python'
    argv = [sys.executable] + [arg.replace("'runs/tiny", f"'{run_dir}") for arg in command[1:]]
    result = subprocess.run(argv + fewer[command[2]], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outputs[command[2]] = result.stdout
  train = outputs['st_moe_jax.train']
  # Progress in order: loading, data, model, compiling, the first step, the last step.
  order = ['st_moe_jax.train: loading', "data: 'stdlib_span_corruption'", 'model EncoderDecoder: ',
           'compiling the train step', 'step      1/3', 'step      3/3']
  positions = [train.find(marker) for marker in order]
  assert -1 not in positions and positions == sorted(positions), train
  assert re.search(r'model EncoderDecoder: [\d,]+ parameters \| mesh ', train)
  assert 'evaluating stdlib_span_corruption (validation): 2/2 batches' in outputs['st_moe_jax.evaluate']
  assert 'decoding stdlib_span_corruption (validation): 1/' in outputs['st_moe_jax.infer']
  assert os.path.exists(os.path.join(run_dir, 'checkpoint_3'))
  assert any(name.endswith('-predict.jsonl-00000-of-00001') for name in os.listdir(run_dir + '/infer'))
