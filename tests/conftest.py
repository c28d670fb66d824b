"""Test setup: 8 simulated CPU devices, so multi-device meshes are real in tests."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cli_error(capsys):
  """cli_error(argv, main=st_moe_jax.train.main) -> the one-line error a bad command line exits with (code 2).

  Runs `main` from the repository root (gin files are relative to it) and checks the error is a clear
  'ERROR: ...' with no traceback.
  """
  def run(argv, main=None):
    if main is None:
      from st_moe_jax import train  # pylint: disable=g-import-not-at-top
      main = train.main
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
      with pytest.raises(SystemExit) as exit_info:
        main(argv)
    finally:
      os.chdir(cwd)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('ERROR: ') and 'Traceback' not in err, err
    return err
  return run


@pytest.fixture
def check_iterator_resumes(tmp_path):
  """check(make_iterator): an iterator saved after 3 batches and restored into a fresh one (as a new process
  would make it) gives the same next 2 batches."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  def check(make_iterator):
    it = make_iterator()
    for _ in range(3):
      next(it)
    it.save(str(tmp_path / 'ds' / 'train_ds'))
    expected = [next(it) for _ in range(2)]
    fresh = make_iterator()
    fresh.restore(str(tmp_path / 'ds' / 'train_ds'))
    for want in expected:
      got = next(fresh)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])
  return check
