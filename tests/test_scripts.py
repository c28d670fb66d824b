"""Smoke tests of the benchmark scripts and the demo: they run with tiny flags and their output has the
documented format (JSON lines, shell-quoted command lines)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, as a user runs them
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_bench_train_step_prints_json_lines():
  result = run_script('scripts/bench_train_step.py', '--configs', 'tiny', '--tiny_shape', '2x32',
                      '--repeats', '1', '--warmup', '1')
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
  header, tiny = lines
  assert header['shapes'] == {'tiny': {'batch': 2, 'encoder_length': 32, 'decoder_length': 8}}
  assert tiny['config'] == 'tiny' and tiny['tokens_per_step'] == 2 * (32 + 8)
  assert set(tiny['tokens_per_s']) == {'dense', 'gather', 'einsum'}
  assert all(v > 0 for v in tiny['tokens_per_s'].values())
  assert tiny['moe_vs_dense'] == pytest.approx(tiny['tokens_per_s']['gather'] / tiny['tokens_per_s']['dense'],
                                               rel=1e-2)
  assert isinstance(tiny['meets_target'], bool) and 'einsum_vs_dense' in tiny


def test_demo_echoes_commands_a_shell_can_run():
  """The command lines demo.py prints, pasted into bash, give the program exactly the arguments it ran with
  (gin's inner quotes included)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('demo', os.path.join(REPO, 'scripts', 'demo.py'))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  args = ['st_moe_jax.train', '--gin.MIXTURE_OR_TASK_NAME="stdlib_lm"', "--gin.TASK_FEATURE_LENGTHS={'targets': 256}",
          '--gin.MODEL_DIR="/tmp/a dir/run"']
  line = demo.command_line(args)
  shell = subprocess.run(['bash', '-c', 'printf "%s\\n" ' + line.split(' ', 1)[1]], capture_output=True, text=True,
                         check=True)
  assert shell.stdout.splitlines() == ['-m', *args]
