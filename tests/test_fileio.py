"""The path layer: URIs stay URIs (no `<cwd>/gs:/...`), local paths behave as os/open do.
gs:// itself, end to end against an emulator, is tests/test_gcs_paths.py."""

import os

import pytest

from st_moe_jax import cli
from st_moe_jax import fileio


def test_uri_strings_stay_uris():
  assert fileio.is_remote('gs://bucket/run') and not fileio.is_remote('runs/gs_run')
  assert fileio.absolute('gs://bucket/run/') == 'gs://bucket/run'
  assert fileio.join('gs://bucket/run', 'checkpoint_2', 'params') == 'gs://bucket/run/checkpoint_2/params'
  assert fileio.basename('gs://bucket/run/checkpoint_2') == 'checkpoint_2'
  assert fileio.dirname('gs://bucket/run/config.gin') == 'gs://bucket/run'


def test_local_paths_as_before(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fileio.absolute('run') == os.path.join(str(tmp_path), 'run')
  fileio.makedirs('run/a')
  fileio.makedirs('run/a')  # exists: fine
  fileio.write_text('run/config.gin', 'x = 1\n')
  with fileio.open('run/config.gin', 'a') as f:
    f.write('y = 2\n')
  assert fileio.read_text('run/config.gin') == 'x = 1\ny = 2\n'
  with pytest.raises(FileExistsError):
    fileio.open('run/config.gin', 'x')
  assert sorted(fileio.listdir('run')) == ['a', 'config.gin']
  fileio.rename('run/a', 'run/b')
  assert fileio.isdir('run/b') and not fileio.exists('run/a')
  with fileio.probe_file('run'):
    assert any(n.startswith('.write-check-') for n in os.listdir('run'))
  assert sorted(os.listdir('run')) == ['b', 'config.gin']
  fileio.remove('run/config.gin')
  assert not fileio.exists('run/config.gin')
  assert not os.path.exists('gs:')


def test_check_writable_read_only_local_folder(tmp_path):
  if os.geteuid() == 0:
    target = '/proc/st_moe_jax_not_writable'  # root may write anywhere else
  else:
    read_only = tmp_path / 'ro'
    read_only.mkdir()
    read_only.chmod(0o500)
    target = str(read_only / 'out')
  with pytest.raises(cli.UserError, match=r'^EVAL_OUTPUT_DIR .* is not writable: '):
    cli.check_writable(target, 'EVAL_OUTPUT_DIR')
