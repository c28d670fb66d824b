"""Multi-process training on one machine, as on a pod (scripts/launch_local.sh): 2 processes × 4 simulated
CPU devices joined by jax.distributed (gloo collectives), each reading its own data shard.

The slow tests share two rounds of real runs (module fixture `runs`), run side by side (JAX's
compilation cache spares the resumed run its compilation):
  1. `killed`: 2 processes train with checkpoints; process 1 is SIGKILLed after step 3, and process 0 must
     then stop by itself. Beside it, `reference`: 1 process × 8 devices on the same global batches.
  2. `killed` resumed with scripts/launch_local.sh 2; meanwhile this process (1 process, 8 devices)
     evaluates a copy of its checkpoint_2. The tests then resume that copy in this process (another process
     count: a clear error) and restore the checkpoints here to compare parameters.
"""

import contextlib
import glob
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tiny_flags import LM  # pylint: disable=g-bad-import-order  (tests/ is on sys.path)

# One xdist worker runs them all, so that the module fixture's runs happen once (run_tests.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group('multiprocess')

STEPS = 4
HEARTBEAT_S = 10
ENV = {**os.environ, 'PYTHONPATH': REPO, 'PYTHON': sys.executable, 'JAX_PLATFORMS': 'cpu',
       'TF_CPP_MIN_LOG_LEVEL': '3'}


def train_args(model_dir: str, steps: int) -> list[str]:
  # Synchronous saves: checkpoint_2 is complete once any process logs step 3.
  return ['--gin_file=gin/runs/pretrain.gin', *LM, f'--gin.MODEL_DIR="{model_dir}"',
          f'--gin.TRAIN_STEPS={steps}', '--gin.LOG_PERIOD=1', '--gin.EVAL_PERIOD=0',
          '--gin.CHECKPOINT_PERIOD=2', '--gin_bindings=train_script.train.async_checkpointing = False']


# One process on 8 devices training on the global batches a 2-process run sees. The batch is sharded over
# ('expert', 'data') on the mesh (data 2, expert 4), whose data rows are process 0's and process 1's
# devices: global row 2r + p is row r of process p's shard.
REFERENCE = '''
import sys
import seqio
import tensorflow as tf
from st_moe_jax import data, train
get_dataset = data.get_dataset

def two_shards(cfg, kind, *, num_processes=1, shard=None, **kwargs):
  a, b = (get_dataset(cfg, kind, num_processes=2, shard=seqio.ShardInfo(i, 2), **kwargs) for i in (0, 1))
  interleave = lambda x, y: tf.reshape(tf.stack([x, y], 1), [-1] + x.shape[1:].as_list())
  return tf.data.Dataset.zip((a, b)).map(lambda x, y: {k: interleave(x[k], y[k]) for k in x})

data.get_dataset = two_shards
train.main(sys.argv[1:])
'''


def popen(command, log_path, **env):
  return subprocess.Popen(command, cwd=REPO, env={**ENV, **env}, stdout=open(log_path + '.out', 'w'),
                          stderr=open(log_path + '.err', 'w'), text=True)


def read(log_path: str, stream: str = 'out') -> str:
  with open(f'{log_path}.{stream}') as f:
    return f.read()


def losses(text: str) -> dict[int, str]:
  """{step: printed loss} of a run's log lines."""
  return {int(m.group(1)): m.group(2) for m in re.finditer(r'^step +(\d+)/\d+ +loss (\S+)', text, re.M)}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait(process, log_path, timeout=600):
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    pytest.fail(f'{log_path} still running after {timeout}s: {read(log_path, "err")[-2000:]}')
  return process.returncode


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('mp'))
  # The resumed run compiles what the killed one did: its processes read it from JAX's compilation cache.
  cache = {'JAX_COMPILATION_CACHE_DIR': os.path.join(root, 'jax_cache')}
  d = {name: os.path.join(root, name) for name in ('killed', 'reference', 'copy', 'eval')}
  logs = {name: os.path.join(root, name) for name in ('killed0', 'killed1', 'reference', 'resumed')}
  # Round 1.
  reference = popen([sys.executable, '-c', REFERENCE, *train_args(d['reference'], STEPS)], logs['reference'],
                    XLA_FLAGS='--xla_force_host_platform_device_count=8', **cache)
  port = free_port()
  killed = [popen([sys.executable, '-m', 'st_moe_jax.train', f'--coordinator_address=127.0.0.1:{port}',
                   '--process_count=2', f'--process_index={i}', f'--heartbeat_timeout_seconds={HEARTBEAT_S}',
                   *train_args(d['killed'], 100)], logs[f'killed{i}'],
                  XLA_FLAGS='--xla_force_host_platform_device_count=4', **cache) for i in (0, 1)]
  deadline = time.time() + 600
  while not re.search(r'^step +3/', read(logs['killed1']), re.M):
    if killed[1].poll() is not None or time.time() > deadline:
      for p in killed:
        p.kill()
      pytest.fail(f'process 1 ended or stalled before step 3: {read(logs["killed1"], "err")[-3000:]}')
    time.sleep(0.2)
  killed[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  survivor_rc = wait(killed[0], logs['killed0'], timeout=300)
  survivor_s = time.time() - killed_at
  killed[1].wait()

  # Round 2 (the reference may still run): the resumed run in 2 processes; meanwhile this (1-process,
  # 8-device) process evaluates checkpoint_2 (st_moe_jax.evaluate restores the 2 processes' parameters
  # resharded onto its devices).
  resumed = popen(['scripts/launch_local.sh', '2', *train_args(d['killed'], STEPS)], logs['resumed'], **cache)
  shutil.copytree(os.path.join(d['killed'], 'checkpoint_2'), os.path.join(d['copy'], 'checkpoint_2'))
  evaluate_out = io.StringIO()
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    from st_moe_jax import evaluate  # pylint: disable=g-import-not-at-top
    with contextlib.redirect_stdout(evaluate_out):
      evaluate.main(['--gin_file=gin/runs/eval.gin', *LM, f'--gin.CHECKPOINT_PATH="{d["copy"]}/checkpoint_2"',
                     f'--gin.EVAL_OUTPUT_DIR="{d["eval"]}"', '--gin.EVAL_STEPS=2'])
  except BaseException:  # a failed evaluation (SystemExit included) leaves no runs behind
    reference.kill()
    resumed.send_signal(signal.SIGTERM)  # the launcher passes it on to its processes
    raise
  finally:
    os.chdir(cwd)
  assert wait(reference, logs['reference']) == 0, read(logs['reference'], 'err')[-3000:]
  resumed_rc = wait(resumed, logs['resumed'])
  return {'dirs': d, 'logs': logs, 'resumed_rc': resumed_rc, 'survivor_rc': survivor_rc,
          'survivor_s': survivor_s, 'evaluate_out': evaluate_out.getvalue()}


def params_of(model_dir: str, step: int):
  """A checkpoint's parameters restored by this one process (the project's restore_params), replicated on
  its own 8 devices: orbax reshards them from however many processes saved them."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from st_moe_jax import checkpoint_manager as ckpt_lib
  checkpoint = os.path.join(model_dir, f'checkpoint_{step}')
  here = NamedSharding(Mesh(np.asarray(jax.devices()), ('devices',)), PartitionSpec())
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          ckpt_lib.saved_param_shapes(os.path.join(checkpoint, 'params')),
                          is_leaf=lambda x: hasattr(x, 'shape'))
  params, _ = ckpt_lib.restore_params(checkpoint, abstract)
  assert {leaf.sharding for leaf in jax.tree.leaves(params)} == {here}
  return ckpt_lib.to_numpy(params)


def assert_params_close(a, b):
  import jax
  # The same global batches; only the order of cross-process reductions differs.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.slow
def test_two_processes_train_as_one_process_on_the_same_batches(runs):
  d, logs = runs['dirs'], runs['logs']
  out0, out1 = read(logs['killed0']), read(logs['killed1'])
  assert "mesh {'data': 2, 'expert': 4, 'model': 1} on 8 cpu device(s)" in out0
  reference = losses(read(logs['reference']))
  assert losses(out0)[1] == losses(out1)[1] == reference[1], (out0, reference)
  assert losses(out0)[2] == reference[2] and losses(out0)[3] == reference[3]
  # Each process saved its own data shard's position.
  names = sorted(os.path.basename(p) for p in glob.glob(f'{d["killed"]}/checkpoint_2/dataset/*.index'))
  assert names == ['train_ds-000-of-002.index', 'train_ds-001-of-002.index']
  assert_params_close(params_of(d['killed'], 2), params_of(d['reference'], 2))


@pytest.mark.slow
def test_killed_run_resumes_exactly_with_launch_local(runs):
  d, logs = runs['dirs'], runs['logs']
  assert runs['resumed_rc'] == 0, read(logs['resumed'], 'err')[-3000:]
  out = read(logs['resumed'])
  assert f'Resumed from {d["killed"]}/checkpoint_2.' in out
  # Step 3 was also logged by the killed run: the resumed one takes the same batch from the same state.
  assert losses(out)[3] == losses(read(logs['killed1']))[3]
  assert losses(out)[4] == losses(read(logs['reference']))[4]
  assert_params_close(params_of(d['killed'], STEPS), params_of(d['reference'], STEPS))


@pytest.mark.slow
def test_a_dead_process_stops_the_others_with_one_line(runs):
  """SIGKILL of process 1: process 0 exits non-zero, bounded by the heartbeat timeout, never a hang.

  It ends one of two ways, depending on where it waits when its peer dies (both seen on this host):
  - its collective fails at once (gloo: 'Connection closed by peer'): the CLI's one ERROR line, no traceback;
  - its collective keeps waiting (gloo has no timeout): jaxlib's heartbeat check ends it after
    --heartbeat_timeout_seconds with jaxlib's own message naming the dead task (a C++ abort: rc -6).
  """
  err = read(runs['logs']['killed0'], 'err')
  assert runs['survivor_rc'] not in (0, None), err[-3000:]
  assert runs['survivor_s'] < 6 * HEARTBEAT_S, runs['survivor_s']
  lines = [l for l in err.splitlines() if l.startswith('ERROR: ')]
  if 'Terminating process because the JAX distributed service detected fatal errors' in err:
    assert not lines and runs['survivor_rc'] == -signal.SIGABRT, err[-3000:]
    assert 'The following tasks are unhealthy (stopped sending heartbeats):\n1\n' in err, err[-3000:]
  else:
    assert len(lines) == 1 and lines[0].startswith('ERROR: process 0 of 2: '), err[-3000:]
    assert 'Another process most likely died' in lines[0] and 'Traceback' not in err
    assert runs['survivor_rc'] == 1 and runs['survivor_s'] < HEARTBEAT_S, runs['survivor_s']


@pytest.mark.slow
def test_two_process_checkpoint_evaluates_in_one_process(runs):
  assert 'bits/byte' in runs['evaluate_out'], runs['evaluate_out']
  with open(os.path.join(runs['dirs']['eval'], 'stdlib_lm-metrics.jsonl')) as f:
    metrics = json.loads(f.readline())
  assert metrics['step'] == 2 and metrics['bits_per_byte'] > 0


@pytest.mark.slow
def test_resume_with_another_process_count_stops_early(runs, cli_error):
  """checkpoint_2 of the 2 processes, resumed by this one process: one line naming both counts, before the
  data pipeline or any file of the run is written."""
  copy = runs['dirs']['copy']
  before = sorted(os.listdir(copy))
  err = cli_error(train_args(copy, STEPS))
  assert f'{copy}/checkpoint_2 was saved by 2 processes but this run has 1' in err
  assert '--process_count=2' in err and 'INITIAL_CHECKPOINT_PATH' in err
  assert sorted(os.listdir(copy)) == before


def test_unreachable_coordinator_is_a_timeout_naming_the_address(cli_error):
  port = free_port()  # nothing listens there
  start = time.time()
  err = cli_error([f'--coordinator_address=127.0.0.1:{port}', '--process_count=2', '--process_index=1',
                   '--initialization_timeout=2', *train_args('/tmp/unused', 1)])
  assert time.time() - start < 30
  assert (f'Process 1 of 2 could not reach the JAX coordinator at --coordinator_address=127.0.0.1:{port} '
          'within --initialization_timeout=2s') in err


@pytest.mark.parametrize('flags, expected', [
    (['--coordinator_address=localhost', '--process_count=2', '--process_index=1'], 'must be HOST:PORT'),
    (['--coordinator_address=127.0.0.1:1', '--process_count=2', '--process_index=2'],
     '--process_index=2 must be in [0, --process_count=2)'),
    (['--coordinator_address=127.0.0.1:1', '--process_count=2'], 'needs --process_count and --process_index'),
])
def test_bad_distributed_flags(cli_error, flags, expected):
  assert expected in cli_error([*flags, *train_args('/tmp/unused', 1)])


def test_launch_local_kills_the_others_when_one_fails(tmp_path):
  """The launcher's own logic, with a stand-in module: process 1 fails at once, process 0 would run a
  minute; the launcher stops it and exits with process 1's status."""
  (tmp_path / 'stand_in.py').write_text(
      'import sys, time\n'
      'index = int([a for a in sys.argv if a.startswith("--process_index=")][0].split("=")[1])\n'
      'print("devices", __import__("os").environ["XLA_FLAGS"], flush=True)\n'
      'sys.exit(3) if index == 1 else time.sleep(60)\n')
  start = time.time()
  result = subprocess.run(['scripts/launch_local.sh', '2', '--x'], cwd=REPO, capture_output=True, text=True,
                          env={**ENV, 'PYTHONPATH': str(tmp_path), 'LAUNCH_MODULE': 'stand_in'}, timeout=60)
  assert result.returncode == 3, result.stderr
  assert time.time() - start < 20
  assert 'a process exited with status 3; stopping the other 1.' in result.stderr
  assert result.stdout.count('--xla_force_host_platform_device_count=4') == 2


def test_launch_local_usage():
  result = subprocess.run(['scripts/launch_local.sh', '3', '--x'], cwd=REPO, capture_output=True, text=True,
                          env=ENV)
  assert result.returncode == 2 and 'LAUNCH_DEVICES=8 must be divisible by NUM_PROCESSES=3' in result.stderr
