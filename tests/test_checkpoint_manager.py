"""checkpoint_manager.py: save / keep / restore, the iterator saved with the state, shape errors, damaged
checkpoints named and moved aside, partial restore for fine-tuning."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import checkpoint_manager as ckpt
from st_moe_jax import data


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


PARAMS = {'dense': {'kernel': jnp.arange(6.0).reshape(2, 3)}, 'norm': {'scale': jnp.ones(3)}}
OPT = {'count': jnp.asarray(5, jnp.int32), 'v': {'dense': {'kernel': jnp.full((2, 3), 0.5)}}}


def test_save_keep_restore_with_iterator(tmp_path):
  cfg = data.DatasetConfig('stdlib_lm', {'targets': 8}, batch_size=2)
  make = lambda: data.DataIterator(data.get_dataset(cfg, data.DECODER_ONLY, report_trimming=False))
  it = make()
  manager = ckpt.CheckpointManager(str(tmp_path), period=2, keep=2)
  for step in (2, 4, 6):
    next(it)
    assert manager.should_save(step)
    manager.save(step, jax.tree.map(lambda x: x * step, PARAMS), OPT, it, force=True)
  manager.wait_until_finished()
  assert manager.all_steps() == [4, 6] and not manager.should_save(5)
  expected_next = next(it)
  manager.close()

  manager = ckpt.CheckpointManager(str(tmp_path), period=2, keep=2)
  assert manager.latest_step() == 6
  fresh = make()
  params, opt = manager.restore(6, abstract(PARAMS), abstract(OPT), fresh)
  np.testing.assert_array_equal(params['dense']['kernel'], np.arange(6.0).reshape(2, 3) * 6)
  assert int(opt['count']) == 5
  got = next(fresh)
  for k in expected_next:
    np.testing.assert_array_equal(got[k], expected_next[k])
  assert os.path.exists(tmp_path / 'checkpoint_6' / 'dataset' / 'train_ds-000-of-001.index')
  manager.close()


def test_iterator_of_another_pipeline_is_a_clear_error_not_damage(tmp_path):
  """A data position saved by another pipeline (e.g. before training mixed segments across files) cannot
  be restored: one error naming INITIAL_CHECKPOINT_PATH; the intact checkpoint stays where it is."""
  import tensorflow as tf
  manager = ckpt.CheckpointManager(str(tmp_path), period=1)
  other = data.DataIterator(tf.data.Dataset.range(10).map(lambda i: {'x': i}).shuffle(4, seed=0))
  next(other)
  manager.save(1, PARAMS, OPT, other, force=True)
  manager.wait_until_finished()
  cfg = data.DatasetConfig('stdlib_lm', {'targets': 8}, batch_size=2)
  current = data.DataIterator(data.get_dataset(cfg, data.DECODER_ONLY, report_trimming=False))
  with pytest.raises(ckpt.DataPipelineMismatchError) as error:
    manager.restore(1, abstract(PARAMS), abstract(OPT), current)
  assert not isinstance(error.value, ckpt.CheckpointCorruptError)
  assert f'--gin.INITIAL_CHECKPOINT_PATH="\'{tmp_path}/checkpoint_1\'"' in str(error.value)
  assert manager.all_steps() == [1]
  manager.close()


def test_shape_mismatch_lists_params(tmp_path):
  manager = ckpt.CheckpointManager(str(tmp_path), period=1)
  manager.save(1, PARAMS, OPT, force=True)
  manager.wait_until_finished()
  other = {'dense': {'kernel': jnp.zeros((2, 4))}, 'norm': {'scale': jnp.ones(3)}, 'new': jnp.zeros(2)}
  with pytest.raises(ckpt.CheckpointShapeError) as error:
    manager.check_shapes(1, abstract(other))
  message = str(error.value)
  assert 'dense/kernel: checkpoint (2, 3) vs model (2, 4)' in message
  assert 'missing from the checkpoint' in message and 'new' in message
  with pytest.raises(ckpt.CheckpointShapeError, match='dense/kernel'):
    ckpt.restore_params(str(tmp_path), abstract(other), partial=True)
  manager.close()


def test_optimizer_state_of_another_layout_gets_a_migration_error(tmp_path):
  """A checkpoint whose optimizer statistics have other shapes (e.g. written before Adafactor factored by
  logical axis names) is refused before orbax reads it, naming the leaf and the fine-tuning way out."""
  manager = ckpt.CheckpointManager(str(tmp_path), period=1)
  manager.save(1, PARAMS, OPT, force=True)
  manager.wait_until_finished()
  factored = {'count': OPT['count'], 'v': {'dense': {'kernel': jnp.zeros((2, 1))}}}
  with pytest.raises(ckpt.CheckpointShapeError) as error:
    manager.restore(1, abstract(PARAMS), abstract(factored))
  message = str(error.value)
  assert 'optimizer state of another layout' in message
  assert 'v/dense/kernel: checkpoint (2, 3) vs model (2, 1)' in message
  assert 'INITIAL_CHECKPOINT_PATH' in message and 'checkpoint_1' in message
  params, _ = manager.restore(1, abstract(PARAMS), abstract(OPT))  # the matching layout still restores
  np.testing.assert_array_equal(params['norm']['scale'], np.ones(3))
  manager.close()


def test_partial_restore_for_finetuning(tmp_path):
  manager = ckpt.CheckpointManager(str(tmp_path), period=1)
  manager.save(3, PARAMS, OPT, force=True)
  manager.close()
  model = {**PARAMS, 'head': {'kernel': jnp.full((3, 2), 7.0)}}
  restored, missing = ckpt.restore_params(str(tmp_path), abstract(model), partial=True)
  assert missing == ['head/kernel']
  merged = ckpt.merge_params(model, restored)
  np.testing.assert_array_equal(merged['dense']['kernel'], PARAMS['dense']['kernel'])
  np.testing.assert_array_equal(merged['head']['kernel'], np.full((3, 2), 7.0))
  assert ckpt.checkpoint_step(ckpt.resolve_checkpoint_dir(str(tmp_path))) == 3
  with pytest.raises(FileNotFoundError, match='INITIAL_CHECKPOINT_PATH'):
    ckpt.resolve_checkpoint_dir(str(tmp_path / 'nowhere'))


def largest_data_file(item_dir) -> str:
  """The biggest file of an orbax item (an OCDBT data file holding array chunks)."""
  files = [os.path.join(d, f) for d, _, names in os.walk(item_dir) for f in names if '/d' in d]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize('damage', ['truncated_chunk', 'truncated_index', 'deleted_metadata'])
def test_damaged_checkpoint_is_named_and_moved_aside(tmp_path, damage):
  manager = ckpt.CheckpointManager(str(tmp_path), period=1)
  big = {'w': jnp.arange(4096.0).reshape(64, 64)}  # chunks larger than OCDBT's inline values
  for step in (1, 2):
    manager.save(step, big, OPT, force=True)
  manager.wait_until_finished()
  params_dir = tmp_path / 'checkpoint_2' / 'params'
  if damage == 'truncated_chunk':
    path = largest_data_file(params_dir)
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == 'truncated_index':
    # Every OCDBT file cut short: the tree index reads as empty, which is damage, not another model.
    for d, _, names in os.walk(params_dir):
      for name in names if '/d' in d else ():
        with open(os.path.join(d, name), 'r+b') as f:
          f.truncate(os.path.getsize(os.path.join(d, name)) // 2)
  else:
    os.remove(params_dir / '_METADATA')
  with pytest.raises(ckpt.CheckpointCorruptError) as error:
    manager.restore(2, abstract(big), abstract(OPT))
  message = str(error.value)
  assert message.startswith('checkpoint_2 is corrupt: ') and len(message.splitlines()) == 1, message
  assert ('_METADATA is missing' if damage == 'deleted_metadata' else 'params') in message
  aside = manager.move_aside(2)
  assert os.path.basename(aside).startswith('checkpoint_2.corrupt-') and os.path.isdir(aside)
  assert manager.all_steps() == [1] and ckpt.latest_checkpoint_step(str(tmp_path)) == 1
  params, _ = manager.restore(1, abstract(big), abstract(OPT))
  np.testing.assert_array_equal(params['w'], np.arange(4096.0).reshape(64, 64))
  manager.save(2, big, OPT, force=True)  # the step can be saved again
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2]
  manager.close()
