"""Test setup: 8 simulated CPU devices, so multi-device meshes are real in tests; rank promotion raises."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# CPU only, even with libtpu installed (requirements-test.txt: tests/test_compile_tpu.py compiles for TPU
# topologies that libtpu describes without a TPU): no TPU backend is probed, jax.devices() stays the CPUs.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Implicit rank promotion ([T, E] + [E] broadcasting a missing leading axis) is an error in every test
# process: here and in xdist workers (each imports this file) through the config below, and in the
# subprocesses tests start (train, scripts) through the environment they inherit.
os.environ['JAX_NUMPY_RANK_PROMOTION'] = 'raise'


import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_numpy_rank_promotion', 'raise')  # in case jax was imported before this file

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


_STATIC = (str, bool, int, float, type(None))
_JITTED = {}


def _jitted(fn, static_args, static_kwargs):
  """jax.jit of fn with the given static arguments bound, one per (fn, statics): tests share compilations."""
  key = (fn, static_args, tuple(sorted(static_kwargs.items())))
  if key not in _JITTED:
    def call(traced_args, traced_kwargs):
      args = [traced_args[i] if s is None else s[0] for i, s in enumerate(static_args)]
      return fn(*args, **traced_kwargs, **static_kwargs)
    _JITTED[key] = jax.jit(call)
  return _JITTED[key]


@pytest.fixture(params=[True, False], ids=['jit', 'nojit'])
def jit(request):
  """run(fn, *args, **kwargs) -> fn's result, computed under jax.jit (arrays and pytrees traced; str, bool,
  int, float and None static; one compilation per function and static arguments) or, for jit=False, by
  calling fn directly (op by op on concrete values). The pure routing / dispatch functions must agree."""
  if not request.param:
    return lambda fn, *args, **kwargs: fn(*args, **kwargs)

  def run_jitted(fn, *args, **kwargs):
    static_args = tuple((a,) if isinstance(a, _STATIC) else None for a in args)
    traced_args = [None if isinstance(a, _STATIC) else a for a in args]
    static_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, _STATIC)}
    traced_kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, _STATIC)}
    return _jitted(fn, static_args, static_kwargs)(traced_args, traced_kwargs)
  return run_jitted


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Makes `--dist loadgroup` group again (scripts/run_tests.sh) under pytest 9.2 + xdist 3.8: xdist tags a
  grouped test by setting item._nodeid to 'id@group', but pytest 9.2 reads the id from item._id, so every test
  went to its own worker and a module fixture of a group (a real multi-process run) ran once per worker."""
  if not getattr(config.option, 'loadgroup', False):
    return
  from _pytest.nodeid import coerce_node_id  # pylint: disable=g-import-not-at-top
  for item in items:
    tagged = getattr(item, '_nodeid', None)
    if isinstance(tagged, str) and tagged != item.nodeid:
      item._id = coerce_node_id(tagged)  # pylint: disable=protected-access
