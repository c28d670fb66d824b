"""Batches for training and evaluation: seqio task → feature converter → per-process numpy batches.

  task/mixture (tasks/) ─► trim to TASK_FEATURE_LENGTHS ─► feature converter ─► batch ─► numpy dicts
                               (seqio's rule, logged)      (EncDec / LM, packing)  (this process's rows)

Each process reads its own shard of the data (seqio.ShardInfo by jax.process_index()) and yields
`batch_size / process_count` rows; the trainer assembles the global batch over the ('expert', 'data') axes.

The iterator's position is checkpointable exactly as in t5x: the tf.data iterator is saved with
`tf.train.Checkpoint`, so a resumed run continues with the identical next batch (see `DataIterator`).
Token id 0 is padding everywhere (seqio).
"""

import dataclasses
import logging
from typing import Callable, Iterator, Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from st_moe_jax import fileio

# TF must not take accelerator memory from JAX; the input pipeline runs on the host CPU.
tf.config.set_visible_devices([], 'GPU')

Batch = dict[str, np.ndarray]

ENCODER_DECODER = 'encoder_decoder'
DECODER_ONLY = 'decoder_only'
# How many examples are inspected (untrimmed) to tell the user that trimming happens.
TRIM_PROBE_EXAMPLES = 64
PROBE_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read (t5x's utils.DatasetConfig, the fields these runs use).

  Attributes:
    mixture_or_task_name: MIXTURE_OR_TASK_NAME, a seqio task or mixture (tasks/).
    task_feature_lengths: TASK_FEATURE_LENGTHS, e.g. {'inputs': 512, 'targets': 114}; longer sequences are
      trimmed (seqio's rule) and the run says so once.
    split: 'train', 'validation', 'test'.
    batch_size: BATCH_SIZE, the global batch over all processes.
    shuffle: shuffle examples (train).
    seed: shuffle / preprocessing seed; fixed so a run and its resumption see the same stream.
    pack: pack several examples per row (segment ids and positions) or pad each one.
    use_cached: read seqio's cache (not used by the embedded tasks).
    num_epochs: None repeats forever (train); 1 for evaluation.
  """
  mixture_or_task_name: str
  task_feature_lengths: Optional[Mapping[str, int]]
  split: str = 'train'
  batch_size: int = 128
  shuffle: bool = True
  seed: Optional[int] = 0
  pack: bool = True
  use_cached: bool = False
  num_epochs: Optional[int] = None


def feature_converter(model_kind: str, pack: bool) -> seqio.FeatureConverter:
  """seqio's converter for the model kind: encoder_decoder → EncDec, decoder_only → LM (causal)."""
  if model_kind == ENCODER_DECODER:
    return seqio.EncDecFeatureConverter(pack=pack)
  if model_kind == DECODER_ONLY:
    return seqio.LMFeatureConverter(pack=pack)
  raise ValueError(f'Unknown model kind {model_kind!r}; expected {ENCODER_DECODER!r} or {DECODER_ONLY!r}.')


def shard_info() -> Optional[seqio.ShardInfo]:
  """This process's shard of the data, or None with a single process."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return None
  return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def per_process_batch_size(batch_size: int, num_processes: int) -> int:
  if batch_size % num_processes:
    raise ValueError(f'BATCH_SIZE={batch_size} must be divisible by the number of processes '
                     f'({num_processes}); each process reads batch_size / processes rows.')
  return batch_size // num_processes


def _needed_lengths(task_or_mixture, lengths: Mapping[str, int]) -> dict[str, int]:
  """TASK_FEATURE_LENGTHS restricted to the task's output features; every output feature needs one."""
  features = task_or_mixture.output_features
  missing = [k for k in features if k not in lengths and features[k].required]
  if missing:
    raise ValueError(f'TASK_FEATURE_LENGTHS={dict(lengths)} has no length for {missing}; the task '
                     f'{task_or_mixture.name!r} has features {sorted(features)}.')
  return {k: int(v) for k, v in lengths.items() if k in features}


def _report_trimming(task_or_mixture, cfg: DatasetConfig, lengths: Mapping[str, int]) -> dict[str, int]:
  """Logs once whether examples are longer than TASK_FEATURE_LENGTHS; returns {feature: count} over the
  first TRIM_PROBE_EXAMPLES examples.

  seqio's rule: longer sequences are trimmed (by `append_eos_after_trim`, which keeps the EOS, or by the
  task's final trim), and the feature converter only checks lengths. To see what trimming cut, each
  feature is read again with PROBE_FACTOR times its length (the others unchanged). Features that a task
  cuts into chunks of exactly their length (pretraining's `targets` / span corruption's `inputs`) then
  come out about PROBE_FACTOR times longer; they are chunked, not trimmed, and are not counted.
  """
  trimmed = {}
  for key, n in lengths.items():
    probe = {**lengths, key: PROBE_FACTOR * n}
    ds = task_or_mixture.get_dataset(probe, split=cfg.split, use_cached=cfg.use_cached, shuffle=False,
                                      num_epochs=1, trim_output_features=False)
    sizes = [np.size(ex[key]) for ex in ds.take(TRIM_PROBE_EXAMPLES).as_numpy_iterator() if key in ex]
    count = sum(n < size < 0.9 * PROBE_FACTOR * n for size in sizes)
    if count:
      trimmed[key] = count
  if trimmed:
    logging.warning('Examples of %s (%s) are longer than TASK_FEATURE_LENGTHS=%s and are trimmed to it, as '
                    'seqio does (the EOS is kept): %s of the first %d examples. Raise TASK_FEATURE_LENGTHS '
                    'to keep whole examples.', task_or_mixture.name, cfg.split, dict(lengths),
                    ', '.join(f'{k}: {c}' for k, c in trimmed.items()), TRIM_PROBE_EXAMPLES)
  return trimmed


def get_dataset(cfg: DatasetConfig, model_kind: str, *, num_processes: int = 1,
                shard: Optional[seqio.ShardInfo] = None, report_trimming: bool = True) -> tf.data.Dataset:
  """This process's batched tf.data pipeline for `cfg`.

  Returns:
    A dataset of dicts of <int32>[batch_size / num_processes, L] arrays: encoder_input_tokens,
    decoder_input_tokens, decoder_target_tokens, decoder_loss_weights (+ *_segment_ids, *_positions when
    packed). Training batches are full (drop_remainder); evaluation (num_epochs set) keeps the last,
    smaller batch — pad it with `pad_batch`.

  Raises:
    tasks.common.UnknownTaskError for an unknown MIXTURE_OR_TASK_NAME.
  """
  from tasks import common  # pylint: disable=g-import-not-at-top  (registers the tasks)
  task = common.get_task_or_mixture(cfg.mixture_or_task_name)
  if cfg.task_feature_lengths is None:
    raise ValueError('TASK_FEATURE_LENGTHS is required, e.g. {"inputs": 512, "targets": 114}.')
  lengths = _needed_lengths(task, cfg.task_feature_lengths)
  if report_trimming:
    _report_trimming(task, cfg, lengths)
  ds = task.get_dataset(lengths, split=cfg.split, use_cached=cfg.use_cached, shuffle=cfg.shuffle,
                        seed=cfg.seed, shard_info=shard, num_epochs=cfg.num_epochs,
                        trim_output_features=True)
  ds = feature_converter(model_kind, cfg.pack)(ds, lengths)
  rows = per_process_batch_size(cfg.batch_size, num_processes)
  ds = ds.batch(rows, drop_remainder=cfg.num_epochs is None)
  # No autotuning: its optimiser thread competes with the train step for the host's cores, and deleting
  # an iterator waits for a running optimisation, which on a busy 2-core host kept a finished run from
  # exiting for 10-50 s. AUTOTUNE parallelism then means the host's core count.
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.prefetch(2).with_options(options)


def evaluation_reader(cfg: DatasetConfig, model_kind: str, **kwargs) -> Callable[[], 'DataIterator']:
  """A function that gives an iterator over the same batches at every call: every evaluation of a run reads
  the same sample. tf.data draws another order each time a shuffled dataset is read again, so a shuffled one
  is built afresh per call; an unshuffled one is built once. kwargs go to get_dataset."""
  if cfg.shuffle:
    return lambda: DataIterator(get_dataset(cfg, model_kind, **kwargs))
  ds = get_dataset(cfg, model_kind, **kwargs)
  return lambda: DataIterator(ds)


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """Pads a short last evaluation batch with all-padding rows (zero weight in every loss and metric)."""
  rows = next(iter(batch.values())).shape[0]
  if rows == batch_size:
    return batch
  return {k: np.pad(v, [(0, batch_size - rows)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


class DataIterator:
  """Numpy batches from a tf.data pipeline, with a checkpointable position.

  `save(path)` / `restore(path)` write and read the tf.data iterator state with tf.train.Checkpoint (as
  t5x's save_dataset does): after restore, `next()` gives exactly the batch that would have come next.
  The pipeline must be rebuilt identically (same config and seed) before restoring.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(ds=self._iterator)

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    return {k: v.numpy() for k, v in next(self._iterator).items()}

  def save(self, path: str) -> None:
    """Writes the iterator state to files with prefix `path` (path.index, path.data-*)."""
    fileio.makedirs(fileio.dirname(path))
    self._checkpoint.write(path)

  def restore(self, path: str) -> None:
    self._checkpoint.read(path).assert_consumed()


def process_checkpoint_name(process_index: int, process_count: int) -> str:
  """File prefix of one process's iterator state inside a checkpoint (t5x: train_ds-<i>-of-<n>)."""
  return f'train_ds-{process_index:03d}-of-{process_count:03d}'
