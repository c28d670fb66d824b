"""data.py: feature converters (packing on / off), checkpointable iterator, trimming report, sharding."""

import dataclasses
import logging

import numpy as np
import pytest
import seqio

from st_moe_jax import data


def first_batch(cfg, kind, **kwargs):
  return next(data.DataIterator(data.get_dataset(cfg, kind, report_trimming=False, **kwargs)))


@pytest.mark.parametrize('pack', [True, False])
def test_decoder_only_batches(pack):
  cfg = data.DatasetConfig('stdlib_lm', {'targets': 32}, batch_size=4, pack=pack)
  batch = first_batch(cfg, data.DECODER_ONLY)
  expected = {'decoder_target_tokens', 'decoder_input_tokens', 'decoder_loss_weights'}
  if pack:
    expected |= {'decoder_segment_ids', 'decoder_positions'}
  assert set(batch) == expected
  for v in batch.values():
    assert v.shape == (4, 32) and v.dtype == np.int32
  # Inputs are the targets shifted right (per segment when packed), BOS = 0.
  t, i = batch['decoder_target_tokens'], batch['decoder_input_tokens']
  if not pack:
    np.testing.assert_array_equal(i[:, 1:], t[:, :-1])
    assert (i[:, 0] == 0).all()


@pytest.mark.parametrize('pack', [True, False])
def test_encoder_decoder_batches(pack):
  cfg = data.DatasetConfig('stdlib_span_corruption', {'inputs': 32, 'targets': 8}, batch_size=2, pack=pack)
  batch = first_batch(cfg, data.ENCODER_DECODER)
  assert batch['encoder_input_tokens'].shape == (2, 32)
  assert batch['decoder_target_tokens'].shape == (2, 8)
  assert ('encoder_segment_ids' in batch) == pack and ('decoder_positions' in batch) == pack


def test_iterator_restore_gives_identical_next_batches(check_iterator_resumes):
  cfg = data.DatasetConfig('stdlib_lm', {'targets': 16}, batch_size=2, seed=3)
  check_iterator_resumes(
      lambda: data.DataIterator(data.get_dataset(cfg, data.DECODER_ONLY, report_trimming=False)))


def test_trimming_is_reported_once(caplog):
  cfg = data.DatasetConfig('stdlib_span_corruption', {'inputs': 32, 'targets': 4}, split='validation',
                           batch_size=2, pack=False)
  with caplog.at_level(logging.WARNING):
    batch = next(data.DataIterator(data.get_dataset(cfg, data.ENCODER_DECODER)))
  messages = [r.getMessage() for r in caplog.records if 'trimmed' in r.getMessage()]
  assert len(messages) == 1 and 'targets' in messages[0] and 'TASK_FEATURE_LENGTHS' in messages[0]
  assert batch['decoder_target_tokens'].shape == (2, 4)


def test_no_trimming_report_for_chunked_pretraining_features(caplog):
  cfg = data.DatasetConfig('stdlib_lm', {'targets': 32}, split='validation', batch_size=2)
  with caplog.at_level(logging.WARNING):
    data.get_dataset(cfg, data.DECODER_ONLY)
  assert not [r for r in caplog.records if 'trimmed' in r.getMessage()]


def test_process_shards_read_different_data():
  cfg = data.DatasetConfig('stdlib_lm', {'targets': 16}, batch_size=4, shuffle=False)
  a = first_batch(cfg, data.DECODER_ONLY, num_processes=2, shard=seqio.ShardInfo(0, 2))
  b = first_batch(cfg, data.DECODER_ONLY, num_processes=2, shard=seqio.ShardInfo(1, 2))
  assert a['decoder_target_tokens'].shape == (2, 16)  # batch_size / processes rows each
  assert not np.array_equal(a['decoder_target_tokens'], b['decoder_target_tokens'])


def test_every_evaluation_reads_the_same_batches_even_when_shuffled():
  """tf.data reshuffles a shuffled dataset each time it is read again; evaluation_reader gives every call the
  same batches, shuffled or not."""
  take = lambda it, n=3: [next(it)['decoder_target_tokens'] for _ in range(n)]
  for shuffle in (True, False):
    cfg = data.DatasetConfig('stdlib_lm', {'targets': 16}, split='validation', batch_size=2, shuffle=shuffle,
                             num_epochs=1)
    read = data.evaluation_reader(cfg, data.DECODER_ONLY, report_trimming=False)
    np.testing.assert_array_equal(take(read()), take(read()))
  ds = data.get_dataset(dataclasses.replace(cfg, shuffle=True), data.DECODER_ONLY, report_trimming=False)
  assert not np.array_equal(take(data.DataIterator(ds)), take(data.DataIterator(ds)))  # what it guards against


def test_errors():
  from tasks import common
  with pytest.raises(common.UnknownTaskError, match='stdlib_lm'):
    data.get_dataset(data.DatasetConfig('stdlib_lmm', {'targets': 8}), data.DECODER_ONLY)
  with pytest.raises(ValueError, match='divisible by the number of processes'):
    data.per_process_batch_size(6, 4)
  with pytest.raises(ValueError, match='inputs'):
    data.get_dataset(data.DatasetConfig('stdlib_span_corruption', {'targets': 8}), data.ENCODER_DECODER)


def test_pad_batch():
  batch = {'x': np.ones((2, 3), np.int32)}
  padded = data.pad_batch(batch, 4)
  np.testing.assert_array_equal(padded['x'], [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]])
