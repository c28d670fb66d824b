"""notebooks/st_moe_quickstart.ipynb runs headless, top to bottom, without an error in any cell.

The notebook is executed with nbclient in a kernel of this Python (the project's .venv), started in
notebooks/ as Jupyter would start it (the notebook finds the checkout around it), with ST_MOE_NOTEBOOK_STEPS (a few steps) and ST_MOE_NOTEBOOK_GIN (a smaller model) so it
fits CI's time; every cell still runs (install guard, live training, expert load, heat map, generation,
the router switch). Its runs go to a temporary runs/ folder: the checkout's runs/ is left alone.
"""

import json
import os
import sys
import time

import pytest

from tiny_flags import TINY  # pylint: disable=g-bad-import-order  (tests/ is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'st_moe_quickstart.ipynb')
STEPS = 2
# tests/tiny_flags.py's dims and shorter rows; the einsum dispatch and, for the SparseMixer run, capacity
# instead of dropless grouped matmuls: they compile fastest (tests/test_dropless.py covers dropless).
SMALL = [*TINY, '--gin.BATCH_SIZE=8', "--gin.TASK_FEATURE_LENGTHS={'targets':64}",
         "--gin.DISPATCH_METHOD='einsum'", '--gin.DROPLESS=False', '--gin.EVAL_STEPS=2']
TIMEOUT_S = 300  # per cell


def test_notebook_is_stored_without_outputs():
  with open(NOTEBOOK, encoding='utf-8') as f:
    notebook = json.load(f)
  code = [c for c in notebook['cells'] if c['cell_type'] == 'code']
  assert code and all(not c['outputs'] and c['execution_count'] is None for c in code)


def test_read_scalars_reads_back_what_a_run_wrote(tmp_path):
  """summaries.read_scalars (the notebook's live plot): {tag: (steps, values)} in step order, and a record
  still being written at the end of the file is left out."""
  from st_moe_jax import summaries
  writer = summaries.SummaryWriter(str(tmp_path))
  writer.write(2, {'loss': 1.5})
  writer.write(1, {'loss': 2.0, 'experts/decoder/layers_1/expert_usage': 0.75})
  writer.close()
  (path,) = tmp_path.glob('events.out.tfevents.*')
  with open(path, 'ab') as f:
    f.write(open(path, 'rb').read()[-30:-10])  # a torn record
  assert summaries.read_scalars(str(tmp_path)) == {
      'loss': ([1, 2], [2.0, 1.5]), 'experts/decoder/layers_1/expert_usage': ([1], [0.75])}
  assert summaries.read_scalars(str(tmp_path / 'missing')) == {}
  # A resumed run writes step 2 again, in a newer file: its value wins.
  time.sleep(1.1)  # event file names carry the time in seconds
  writer = summaries.SummaryWriter(str(tmp_path))
  writer.write(2, {'loss': 1.25})
  writer.close()
  assert summaries.read_scalars(str(tmp_path))['loss'] == ([1, 2], [2.0, 1.25])


def _kernel_spec(tmp_path) -> str:
  """A kernelspec for this interpreter (JUPYTER_PATH points at it): not whatever 'python3' resolves to."""
  spec_dir = tmp_path / 'jupyter' / 'kernels' / 'st_moe_test'
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'st_moe_jax test', 'language': 'python'}))
  return str(tmp_path / 'jupyter')


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  import nbclient
  import nbformat

  monkeypatch.setenv('JUPYTER_PATH', _kernel_spec(tmp_path))
  monkeypatch.setenv('JUPYTER_RUNTIME_DIR', str(tmp_path / 'jupyter_runtime'))  # connection files
  monkeypatch.setenv('IPYTHONDIR', str(tmp_path / 'ipython'))
  monkeypatch.setenv('ST_MOE_NOTEBOOK_STEPS', str(STEPS))
  monkeypatch.setenv('ST_MOE_NOTEBOOK_GIN', ' '.join(SMALL))
  monkeypatch.setenv('ST_MOE_NOTEBOOK_RUNS', str(tmp_path / 'runs'))
  # One CPU device, as a user's kernel has (tests/conftest.py simulates 8 for the mesh tests).
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, kernel_name='st_moe_test', timeout=TIMEOUT_S,
                                   resources={'metadata': {'path': os.path.join(REPO, 'notebooks')}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'A notebook cell raised:\n{e}')
  outputs = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs]
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert f'step {STEPS:>6d}/{STEPS}' in text  # the main run finished
  images = sum('image/png' in o.get('data', {}) for o in outputs)
  assert images >= 4, images  # live loss plots, expert load, heat map
  assert os.path.isdir(tmp_path / 'runs' / 'notebook' / 'expert_analysis')
