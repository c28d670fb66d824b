"""Where metrics go: TensorBoard event files and the console lines of a run (t5x's tags and layout)."""

import time
from typing import Callable, Mapping, Optional, Sequence

import jax


class SummaryWriter:
  """TensorBoard scalars in event files under `directory` (process 0 only).

  Written with TF's core summary op and the 'scalars' plugin metadata, which is what tf.summary.scalar
  writes; writing does not need the tensorboard package (requirements.txt pins it for viewing:
  `tensorboard --logdir MODEL_DIR`).
  """

  def __init__(self, directory: str):
    self._writer = None
    if jax.process_index() == 0:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars')).SerializeToString()
      self._writer = tf.summary.create_file_writer(directory)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    with self._writer.as_default():
      for tag, value in scalars.items():
        self._tf.summary.write(tag, self._tf.constant(float(value), self._tf.float32), step=step,
                               metadata=self._metadata)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def write_scalars(directory: str, step: int, scalars: Mapping[str, float]) -> None:
  """One point of each scalar in `directory` (an evaluation's results)."""
  writer = SummaryWriter(directory)
  writer.write(step, scalars)
  writer.close()


def read_scalars(directory: str) -> dict[str, tuple[list[int], list[float]]]:
  """The scalars a SummaryWriter wrote in `directory` (e.g. MODEL_DIR/train): {tag: (steps, values)}, in
  step order; a step written again after a resume keeps its last value (files are read in name, i.e. time,
  order). Safe to call while a run is writing there: a record not yet complete is left out."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  from st_moe_jax import fileio  # pylint: disable=g-import-not-at-top
  points: dict[str, dict[int, float]] = {}
  if not fileio.isdir(directory):
    return {}
  for name in sorted(fileio.listdir(directory)):
    if not name.startswith('events.out.tfevents.'):
      continue
    try:
      for record in tf.data.TFRecordDataset(fileio.join(directory, name)):
        event = event_pb2.Event.FromString(record.numpy())
        for value in event.summary.value:
          points.setdefault(value.tag, {})[int(event.step)] = float(tf.make_ndarray(value.tensor))
    except tf.errors.DataLossError:
      pass  # the writer's last record is being written
  return {tag: (sorted(p), [p[step] for step in sorted(p)]) for tag, p in points.items()}


def _step_metrics(step: int, total: int, metrics: Mapping[str, float]) -> str:
  return (f'step {step:>6d}/{total}  loss {metrics["loss"]:.4f}  ce {metrics["cross_ent_loss"]:.4f}  '
          f'acc {metrics["accuracy"]:.3f}  lr {metrics["learning_rate"]:.2e}  ')


def train_line(step: int, total: int, metrics: Mapping[str, float], steps_per_s: float,
               tokens_per_s: float, elapsed_s: float) -> str:
  return (_step_metrics(step, total, metrics)
          + f'| {steps_per_s:.2f} steps/s  {tokens_per_s / 1e3:.1f}k tokens/s  [{elapsed_s:.0f}s]')


def first_step_line(step: int, total: int, metrics: Mapping[str, float], compile_s: float,
                    elapsed_s: float) -> str:
  return _step_metrics(step, total, metrics) + f'| first step, compiled in {compile_s:.0f}s  [{elapsed_s:.0f}s]'


def startup_line(model_name: str, num_params: int, mesh_shape: Mapping[str, int], devices: Sequence,
                 batch_shapes: Mapping[str, Sequence[int]]) -> str:
  platform = devices[0].platform if devices else '?'
  batch = ', '.join(f'{k.split("_")[0]} {"x".join(map(str, batch_shapes[k]))}'
                    for k in ('encoder_input_tokens', 'decoder_target_tokens') if k in batch_shapes)
  return (f'model {model_name}: {num_params:,} parameters | mesh {dict(mesh_shape)} on {len(devices)} '
          f'{platform} device(s) | batch {batch}')


def eval_line(step: int, name: str, results: Mapping[str, float], elapsed_s: float) -> str:
  bits = f'  bits/byte {results["bits_per_byte"]:.3f}' if 'bits_per_byte' in results else ''
  return (f'eval  {step:>6d}  {name}: loss {results["loss"]:.4f}  accuracy {results["accuracy"]:.3f}'
          f'{bits}  [{elapsed_s:.0f}s]')


class Progress:
  """Progress lines of a loop over batches: '<label>: starting' at once, then at most one line every
  `every_s` seconds ('<label>: 40/125 batches [12s]'); `done()` prints the final count."""

  def __init__(self, label: str, total: Optional[int] = None, every_s: float = 10.0,
               print_fn: Optional[Callable[[str], None]] = None):
    self._label, self._total, self._every_s = label, total, every_s
    self._print = print_fn or (lambda line: print(line, flush=True))
    self._count = 0
    self._start = self._last = time.time()
    if jax.process_index() == 0:
      self._print(f'{label}: starting' + (f' ({total} batches)' if total else ''))

  def _line(self) -> str:
    of = f'/{self._total}' if self._total else ''
    return f'{self._label}: {self._count}{of} batches [{time.time() - self._start:.0f}s]'

  def update(self, n: int = 1) -> None:
    self._count += n
    now = time.time()
    if now - self._last >= self._every_s and jax.process_index() == 0:
      self._last = now
      self._print(self._line())

  def done(self) -> None:
    if jax.process_index() == 0:
      self._print(self._line())
