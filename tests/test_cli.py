"""Entry points: t5x-style flags, clear errors for bad input (no stack traces), a tiny train + eval run."""

import json
import os
import subprocess
import sys

import pytest

from st_moe_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tiny_flags import LM  # pylint: disable=g-bad-import-order  (tests/ is on sys.path)


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


@pytest.mark.parametrize('extra, expected', [
    (['--gin.DROPLESS_TILE_SIZE=0'], 'MoeConfig.dropless_tile_size must be >= 1, got 0 (gin: DROPLESS_TILE_SIZE).'),
    (["--gin.DECODER_SPARSE_LAYOUT='SOMETIMES'"], 'MoeConfig.sparse_layout must be one of'),
    (['--gin_file=gin/routers/lory.gin', '--gin.JITTER_NOISE=0.1'], 'ignores jitter_noise=0.1'),
    (['--gin.NUM_DECODER_SPARSE_LAYERS=5'], 'moe: num_sparse_layers=5 does not fit a stack of 2 layers'),
    (["--gin.LEARNING_RATE_SCALES={'(^|/)experts/': 0.3}"],
     "learning_rate_scales pattern '(^|/)experts/' matches no parameter"),
])
def test_bad_model_settings_are_one_line_errors(tmp_path, cli_error, extra, expected):
  """MoeConfig / model checks raised inside gin's configurable calls reach the user as one line."""
  err = cli_error(pretrain_args(tmp_path, *extra))
  assert expected in err and 'In call to configurable' not in err


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


# ---------------------------------------------------------------------------------------------------------
# Clear one-line errors for the usual mistakes (issue 13).

def _without(argv, *prefixes):
  return [a for a in argv if not a.startswith(prefixes)]


def eval_args(*extra):
  return ['--gin_file=gin/runs/eval.gin', *LM, '--gin.CHECKPOINT_PATH="/nonexistent/run"',
          '--gin.EVAL_OUTPUT_DIR="/nonexistent/run/eval"', *extra]


def infer_args(*extra):
  return ['--gin_file=gin/runs/infer.gin', *LM, '--gin.CHECKPOINT_PATH="/nonexistent/run"',
          '--gin.INFER_OUTPUT_DIR="/nonexistent/run/infer"', *extra]


def _main_of(name):
  from st_moe_jax import evaluate, infer, train  # pylint: disable=g-import-not-at-top
  return {'train': train.main, 'evaluate': evaluate.main, 'infer': infer.main}[name]


@pytest.mark.parametrize('macro, example', [
    ('MIXTURE_OR_TASK_NAME', '--gin.MIXTURE_OR_TASK_NAME="\'stdlib_lm\'"'),
    ('TASK_FEATURE_LENGTHS', '--gin.TASK_FEATURE_LENGTHS="{\'targets\': 256}"'),
    ('TRAIN_STEPS', '--gin.TRAIN_STEPS=1000'),
    ('MODEL_DIR', '--gin.MODEL_DIR="\'runs/my_run\'"')])
def test_unset_required_macro_train(tmp_path, cli_error, macro, example):
  err = cli_error(_without(pretrain_args(tmp_path), f'--gin.{macro}='))
  assert err.startswith(f'ERROR: {macro} is required') and example in err


@pytest.mark.parametrize('name, args, macros', [
    ('evaluate', eval_args, ['MIXTURE_OR_TASK_NAME', 'CHECKPOINT_PATH', 'EVAL_OUTPUT_DIR',
                             'TASK_FEATURE_LENGTHS']),
    ('infer', infer_args, ['MIXTURE_OR_TASK_NAME', 'TASK_FEATURE_LENGTHS', 'CHECKPOINT_PATH',
                           'INFER_OUTPUT_DIR'])])
def test_unset_required_macros_evaluate_infer(cli_error, name, args, macros):
  # Every REQUIRED macro of the run file unset: one line names them all, each with an example.
  err = cli_error(_without(args(), *[f'--gin.{m}=' for m in macros]), main=_main_of(name))
  assert len(err.strip().splitlines()) == 1
  for macro in macros:
    assert f'--gin.{macro}=' in err


def test_train_steps_relative_stands_in_for_train_steps(tmp_path, cli_error):
  # finetune.gin: TRAIN_STEPS may stay REQUIRED when TRAIN_STEPS_RELATIVE is set; 0 relative steps is an
  # error of its own.
  argv = _without(pretrain_args(tmp_path), '--gin.TRAIN_STEPS=') + ['--gin.TRAIN_STEPS_RELATIVE=0']
  assert 'TRAIN_STEPS_RELATIVE=0 must be a positive' in cli_error(argv)


@pytest.mark.parametrize('name, args', [('train', None), ('evaluate', eval_args), ('infer', infer_args)])
def test_no_model_gin_file(tmp_path, cli_error, name, args):
  argv = pretrain_args(tmp_path) if args is None else args()
  err = cli_error(_without(argv, '--gin_file=gin/models/'), main=_main_of(name))
  assert err.startswith('ERROR: no model gin file: add --gin_file=gin/models/st_moe_tiny.gin')


@pytest.mark.parametrize('steps', ['0', '-5'])
def test_train_steps_not_positive(tmp_path, cli_error, steps):
  err = cli_error(pretrain_args(tmp_path, f'--gin.TRAIN_STEPS={steps}'))
  assert f'TRAIN_STEPS={steps} must be a positive whole number of steps' in err
  assert not os.listdir(tmp_path)  # stopped before anything was written


def test_unquoted_string_macro(tmp_path, cli_error):
  err = cli_error(pretrain_args(tmp_path, '--gin.MODEL_DIR=runs/x'))
  assert '--gin.MODEL_DIR="\'runs/x\'"' in err and 'inner quotes' in err


def test_undefined_macro(tmp_path, cli_error):
  err = cli_error(pretrain_args(tmp_path, '--gin.NUM_EXPERT_PARTITIONS=%NO_SUCH_MACRO'))
  assert 'NO_SUCH_MACRO is not set' in err


def test_decoder_only_task_on_encoder_decoder(tmp_path, cli_error):
  err = cli_error(_without(pretrain_args(tmp_path), '--gin_file=gin/runs/decoder_only.gin'))
  assert "'stdlib_lm' is a decoder-only task" in err and '--gin_file=gin/runs/decoder_only.gin' in err


def test_encoder_decoder_task_on_decoder_only(tmp_path, cli_error):
  err = cli_error(pretrain_args(tmp_path, '--gin.MIXTURE_OR_TASK_NAME="stdlib_span_corruption"',
                                "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}"))
  assert "'stdlib_span_corruption' is an encoder-decoder task" in err and 'decoder_only.gin' in err


@pytest.mark.parametrize('decoder_only, lengths, rule', [
    (True, "{'target': 32}", "decoder-only tasks have only 'targets'"),
    (False, "{'targets': 32}", "encoder-decoder tasks need 'inputs' and 'targets'")])
def test_wrong_task_feature_length_keys(tmp_path, cli_error, decoder_only, lengths, rule):
  argv = pretrain_args(tmp_path, f'--gin.TASK_FEATURE_LENGTHS={lengths}')
  if not decoder_only:
    argv = _without(argv, '--gin_file=gin/runs/decoder_only.gin') + [
        '--gin.MIXTURE_OR_TASK_NAME="stdlib_span_corruption"']
  err = cli_error(argv)
  assert f'TASK_FEATURE_LENGTHS={lengths} does not fit' in err and rule in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
  from st_moe_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO)
  argv = pretrain_args(tmp_path, '--gin.TRAIN_STEPS=0')
  with pytest.raises(cli.UserError, match='TRAIN_STEPS=0'):
    train.main(argv + ['--debug'])
  monkeypatch.setenv('ST_MOE_DEBUG', '1')
  with pytest.raises(cli.UserError, match='TRAIN_STEPS=0'):
    train.main(argv)


def test_tensorflow_noise_dropped_real_lines_kept():
  import st_moe_jax  # pylint: disable=g-import-not-at-top
  text = ('WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n'
          'I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on. You may see ...\n'
          'E0000 00:00:1.0 1 something.cc:1] a real error\n')
  assert st_moe_jax.drop_tensorflow_noise(text) == 'E0000 00:00:1.0 1 something.cc:1] a real error\n'


def test_help_has_no_tensorflow_noise():
  result = run_cli('st_moe_jax.train', ['--help'])
  assert result.returncode == 0 and 'usage:' in result.stdout
  for noise in ('absl::InitializeLog', 'oneDNN', 'cuda drivers', 'cuInit'):
    assert noise not in result.stderr, result.stderr


def test_gin_files_from_another_folder(tmp_path, monkeypatch, capsys, caplog):
  """From outside the repository, --gin_search_paths=/path/to/repo finds the run and model files and their
  includes, without gin's 'Path not found' log lines for the search paths that do not have them."""
  from st_moe_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit):
    train.main([f'--gin_search_paths={REPO}', *pretrain_args(tmp_path / 'run', '--gin.TRAIN_STEPS=0')])
  assert 'TRAIN_STEPS=0 must be a positive' in capsys.readouterr().err  # the gin files were all read
  assert not [r for r in caplog.records if 'Path not found' in r.getMessage()]


def test_pyproject_entry_points_and_package_data():
  import importlib  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)
  scripts = project['project']['scripts']
  assert sorted(scripts) == ['st-moe-evaluate', 'st-moe-infer', 'st-moe-train']
  for target in scripts.values():
    module, function = target.split(':')
    assert callable(getattr(importlib.import_module(module), function))
  setuptools = project['tool']['setuptools']
  assert setuptools['packages'] == ['st_moe_jax', 'tasks']
  for pattern in setuptools['package-data']['st_moe_jax']:
    assert glob.glob(os.path.join(REPO, 'st_moe_jax', pattern)), pattern


@pytest.mark.parametrize('name', ['evaluate', 'infer', 'train'])
def test_missing_checkpoint_path(tmp_path, cli_error, name):
  if name == 'train':
    argv = pretrain_args(tmp_path / 'run', f'--gin.INITIAL_CHECKPOINT_PATH="{tmp_path}/nothing"')
  else:
    argv = (eval_args if name == 'evaluate' else infer_args)(f'--gin.CHECKPOINT_PATH="{tmp_path}/nothing"')
  err = cli_error(argv, main=_main_of(name))
  assert f'Checkpoint path {tmp_path}/nothing does not exist' in err


def test_batch_size_zero(tmp_path, cli_error):
  assert 'BATCH_SIZE=0 must be a positive whole number' in cli_error(pretrain_args(tmp_path, '--gin.BATCH_SIZE=0'))


def test_encoder_decoder_task_on_decoder_only_evaluate(tmp_path, cli_error):
  (tmp_path / 'checkpoint_1').mkdir()  # the kind is checked before the checkpoint is read
  err = cli_error(eval_args(f'--gin.CHECKPOINT_PATH="{tmp_path}"',
                            '--gin.MIXTURE_OR_TASK_NAME="stdlib_span_corruption"',
                            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}"), main=_main_of('evaluate'))
  assert "'stdlib_span_corruption' is an encoder-decoder task" in err


# ---------------------------------------------------------------------------------------------------------
# A resume is checked before config.gin is touched; config-<step>.gin keeps each run's config (issue 13).

@pytest.fixture(scope='module')
def trained_dir(tmp_path_factory):
  """A MODEL_DIR trained 2 steps (checkpoint_2), made once; tests resume copies of it."""
  from st_moe_jax import train  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path_factory.mktemp('trained') / 'run'
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    train.main(pretrain_args(model_dir))
  finally:
    os.chdir(cwd)
  return model_dir


def _copy_run(trained_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / 'run'
  shutil.copytree(trained_dir, model_dir)
  return model_dir


def _configs(model_dir):
  return {name: (model_dir / name).read_bytes() for name in sorted(os.listdir(model_dir))
          if name.startswith('config')}


def test_fresh_run_writes_config_history(trained_dir):
  configs = _configs(trained_dir)
  assert sorted(configs) == ['config-0.gin', 'config.gin']
  assert b'BATCH_SIZE = 8' in configs['config-0.gin']


@pytest.mark.slow
def test_resume_with_other_batch_size_is_refused_before_config_is_written(trained_dir, tmp_path, cli_error):
  model_dir = _copy_run(trained_dir, tmp_path)
  before = _configs(model_dir)
  err = cli_error(pretrain_args(model_dir, '--gin.BATCH_SIZE=16', '--gin.TRAIN_STEPS=4'))
  assert err.startswith(f'ERROR: BATCH_SIZE=16 but checkpoint_2 was trained with BATCH_SIZE=8 '
                        f'({model_dir}/config-0.gin)')
  assert _configs(model_dir) == before  # same files, same bytes


@pytest.mark.slow
def test_resume_with_other_model_is_refused_before_config_is_written(trained_dir, tmp_path, cli_error):
  model_dir = _copy_run(trained_dir, tmp_path)
  before = _configs(model_dir)
  err = cli_error(pretrain_args(model_dir, '--gin.NUM_EXPERTS=2', '--gin.TRAIN_STEPS=4'))
  assert 'was written by a model of another shape' in err and 'checkpoint (4,' in err
  assert _configs(model_dir) == before


@pytest.mark.slow
def test_resume_keeps_the_first_runs_config(trained_dir, tmp_path, monkeypatch):
  from st_moe_jax import train  # pylint: disable=g-import-not-at-top
  model_dir = _copy_run(trained_dir, tmp_path)
  before = _configs(model_dir)
  monkeypatch.chdir(REPO)
  train.main(pretrain_args(model_dir, '--gin.TRAIN_STEPS=3', '--gin.EVAL_PERIOD=0'))
  after = _configs(model_dir)
  assert sorted(after) == ['config-0.gin', 'config-2.gin', 'config.gin']
  assert after['config-0.gin'] == before['config-0.gin']
  assert b'TRAIN_STEPS = 3' in after['config-2.gin'] and b'TRAIN_STEPS = 3' in after['config.gin']


def test_write_config_never_overwrites_history(tmp_path):
  from st_moe_jax import train  # pylint: disable=g-import-not-at-top
  train.write_config(str(tmp_path), 'first\n', 0)
  train.write_config(str(tmp_path), 'second\n', 0)  # e.g. a fresh start after a run that saved nothing
  assert _configs(tmp_path) == {'config-0.gin': b'first\n', 'config-0-2.gin': b'second\n',
                                'config.gin': b'second\n'}


# ---------------------------------------------------------------------------------------------------------
# Output folders are checked for writing before any work (issue 13). Tests run as root, which ignores
# permission bits (chmod a-w would not stop it), so the unwritable folder is one under a regular file: that
# fails for root too. A full disk (ENOSPC) is not simulated here; it fails the same check with its reason.

def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path):
  cli.check_writable(str(tmp_path / 'a' / 'b'), 'EVAL_OUTPUT_DIR')
  assert os.listdir(tmp_path / 'a' / 'b') == []


@pytest.mark.parametrize('name', ['train', 'evaluate', 'infer'])
def test_unwritable_output_dir(tmp_path, cli_error, name):
  (tmp_path / 'afile').write_text('a regular file, so no folder can be made under it\n')
  bad = tmp_path / 'afile' / 'sub'
  (tmp_path / 'checkpoint_1').mkdir()  # found, but never read: the output folder is checked first
  if name == 'train':
    macro, argv = 'MODEL_DIR', pretrain_args(bad)
  elif name == 'evaluate':
    macro, argv = 'EVAL_OUTPUT_DIR', eval_args(f'--gin.CHECKPOINT_PATH="{tmp_path}"',
                                               f'--gin.EVAL_OUTPUT_DIR="{bad}"')
  else:
    macro, argv = 'INFER_OUTPUT_DIR', infer_args(f'--gin.CHECKPOINT_PATH="{tmp_path}"',
                                                 f'--gin.INFER_OUTPUT_DIR="{bad}"')
  err = cli_error(argv, main=_main_of(name))
  assert err.startswith(f'ERROR: {macro} {bad} is not writable: Not a directory'), err
  assert len(err.strip().splitlines()) == 1
