"""ST-MoE in JAX/Flax (t5x style).

Importing the package sets TF_CPP_MIN_LOG_LEVEL=3 (unless set) before anything imports TensorFlow, so TF's
C++ INFO/WARNING lines stay off the console; entry points also call `import_tensorflow_quietly` first. On a
host with libtpu installed but no TPU it sets JAX_PLATFORMS=cpu (unless set).
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def _libtpu_without_tpu() -> bool:
  """libtpu installed (requirements-test.txt: compile_tpu compiles for TPU topologies on a CPU host) on a
  host with no TPU and no CUDA plugin."""
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('libtpu') is None:
    return False
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):
    return False
  return not any(importlib.util.find_spec(name) for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin'))


# There, JAX would try libtpu first and print its host-bounds / worker-hostname errors before falling back
# to CPU; JAX_PLATFORMS=cpu goes straight to the CPU (compile_tpu still reaches libtpu for its topology).
if 'JAX_PLATFORMS' not in os.environ and _libtpu_without_tpu():
  os.environ['JAX_PLATFORMS'] = 'cpu'

# Lines TensorFlow's C++ code writes to stderr while it is imported, before its logging is initialised
# (so TF_CPP_MIN_LOG_LEVEL does not apply to them): start-up notices, not problems.
_TF_IMPORT_NOISE = (
    'All log messages before absl::InitializeLog() is called',
    'oneDNN custom operations are on',
    'Could not find cuda drivers',
    'cuInit',
    'Unable to register cuFFT factory',
    'Unable to register cuDNN factory',
    'Unable to register cuBLAS factory',
    'computation placer already registered',
    'TF-TRT Warning: Could not find TensorRT',
    'This TensorFlow binary is optimized to use available CPU instructions',
    'To enable the following instructions',
)


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow (and hides its GPUs from it, as data.py does) with its start-up notices dropped.

  stderr (the file descriptor, where the C++ code writes) goes to a temporary file meanwhile; every other
  line is written back afterwards, so real warnings and errors still show.
  """
  if 'tensorflow' in sys.modules:
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      # Listing GPUs initialises CUDA (the cuInit lines); TF must not take accelerator memory from JAX.
      tf.config.set_visible_devices([], 'GPU')
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = drop_tensorflow_noise(captured.read().decode('utf-8', 'replace'))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def drop_tensorflow_noise(text: str) -> str:
  """`text` without TensorFlow's start-up notice lines."""
  lines = text.splitlines(keepends=True)
  return ''.join(line for line in lines if not any(noise in line for noise in _TF_IMPORT_NOISE))
