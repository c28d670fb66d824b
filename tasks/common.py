"""What every task module shares: vocabularies, input errors, a TFDS source that never downloads, and
name lookup with suggestions.

Task modules register on import (`import tasks.pretraining`, `import tasks.superglue`);
`get_task_or_mixture` imports them first, so a caller only needs the name.
"""

import difflib
import functools
import importlib
import os
import pathlib
import re
from typing import Mapping, Optional, Sequence

import seqio

# The modules whose import registers this project's tasks and mixtures.
TASK_MODULES = ('tasks.pretraining', 'tasks.superglue')

# The public T5 vocabulary (32k pieces + 100 sentinels), shipped with the project under st_moe_jax/assets/
# (its README gives the source and license). ST_MOE_SPM_PATH overrides it. Nothing reads the file until a
# task tokenizes.
BUNDLED_T5_SPM_PATH = str(pathlib.Path(__file__).resolve().parents[1] / 'st_moe_jax' / 'assets'
                          / 't5_cc_all.32000.100extra.spm.model')
T5_SPM_PATH = os.environ.get('ST_MOE_SPM_PATH', BUNDLED_T5_SPM_PATH)

# Task name suffix of the T5-vocabulary twin of every task; the plain names use bytes.
T5_VOCAB_SUFFIX = '_t5vocab'


def default_vocabulary() -> seqio.Vocabulary:
  """ByT5-style bytes: needs no file, so every default task works on any machine."""
  return seqio.ByteVocabulary()


def sentencepiece_vocabulary(path: Optional[str] = None, extra_ids: Optional[int] = None
                             ) -> seqio.Vocabulary:
  """A SentencePiece vocabulary (default: the T5 one) with `extra_ids` sentinels appended.

  extra_ids=None: 100 (T5's sentinels), unless the model file already defines `<extra_id_N>` pieces
  (the bundled copy does: 32101 pieces with <extra_id_0> last) - appending them again would
  fail to load. The model itself is loaded lazily, on first use.
  """
  path = path or T5_SPM_PATH
  if extra_ids is None:
    extra_ids = 0 if baked_in_sentinels(path) else 100
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


@functools.lru_cache(maxsize=None)
def baked_in_sentinels(path: str) -> int:
  """How many `<extra_id_N>` pieces the SentencePiece model at `path` defines (0 if it is absent)."""
  if not os.path.isfile(path):
    return 0
  import sentencepiece  # pylint: disable=g-import-not-at-top  (only needed for this check)
  model = sentencepiece.SentencePieceProcessor(model_file=path)
  pattern = re.compile(r'^\u2581?<extra_id_\d+>$')
  size = model.get_piece_size()
  # Sentinels sit at the top of a vocabulary; looking there keeps this check quick.
  return sum(bool(pattern.match(model.id_to_piece(i))) for i in range(max(size - 200, 0), size))


class TaskInputError(Exception):
  """Bad data or a bad name given to a task. Entry points print the message, not a stack trace."""


class MissingDataError(TaskInputError, FileNotFoundError):
  """A task's data is not on this machine; the message says how to get it."""


class MalformedDataError(TaskInputError, ValueError):
  """A data file could not be parsed; the message names the file and line."""


class UnknownTaskError(TaskInputError, ValueError):
  """No task or mixture of that name; the message lists the registered names that are close."""


class GuardedTfdsSource(seqio.TfdsDataSource):
  """A seqio.TfdsDataSource that raises MissingDataError when the dataset is not prepared.

  seqio's own source would start a download-and-prepare instead, which hangs or fails deep inside TFDS
  on a machine without network (and for C4 would mean terabytes).
  """

  def __init__(self, tfds_name: str, splits: Sequence[str], how_to_get: str):
    super().__init__(tfds_name=tfds_name, splits=splits)
    self._how_to_get = how_to_get

  def _check_prepared(self):
    try:
      builder = self.tfds_dataset.builder
    except Exception as e:  # pylint: disable=broad-except  (TFDS raises AssertionError, ValueError, ...)
      raise MissingDataError(f'TFDS cannot build {self.tfds_dataset.name}: {e} {self._how_to_get}') from e
    if not builder.is_prepared():
      raise MissingDataError(
          f'TFDS dataset {self.tfds_dataset.name} is not prepared (looked in {builder.data_dir}). '
          f'{self._how_to_get}')

  def get_dataset(self, split='train', shuffle=True, seed=None, shard_info=None, **kwargs):
    self._check_prepared()
    return super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)

  def list_shards(self, split):
    self._check_prepared()
    return super().list_shards(split)

  def num_input_examples(self, split):
    self._check_prepared()
    return super().num_input_examples(split)


def import_task_modules(modules: Sequence[str] = TASK_MODULES):
  for module in modules:
    importlib.import_module(module)


def registered_names() -> list[str]:
  """Every registered task and mixture name, sorted."""
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_task_or_mixture(name: str, modules: Sequence[str] = TASK_MODULES):
  """The seqio Task or Mixture called `name`, after importing this project's task modules.

  Raises:
    UnknownTaskError: no such name; the message lists up to five close registered names.
  """
  import_task_modules(modules)
  if name in seqio.MixtureRegistry.names():
    return seqio.get_mixture_or_task(name)
  if name in seqio.TaskRegistry.names():
    return seqio.get_mixture_or_task(name)
  names = registered_names()
  close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
  # Also offer names that contain what was typed (`boolq` → super_glue_boolq_v102).
  close += [n for n in names if name and name in n and n not in close][:5 - len(close)]
  if close:
    hint = 'Did you mean: ' + ', '.join(close) + '?'
  else:
    hint = (f'No registered name is close; {len(names)} are registered '
            '(list them with seqio.TaskRegistry.names() / seqio.MixtureRegistry.names()).')
  raise UnknownTaskError(
      f'Unknown task or mixture {name!r}. {hint} Tasks outside {", ".join(modules)} must be imported '
      'first (e.g. `import my_tasks` in the gin file).')


def text_of(value) -> str:
  """A feature value from a numpy example (bytes, numpy bytes or str) as str."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if hasattr(value, 'item'):
    return text_of(value.item())
  return str(value)


def output_features(vocabulary: seqio.Vocabulary, inputs: bool = True,
                    add_eos: bool = True) -> Mapping[str, seqio.Feature]:
  """T5's output features: `inputs` (optional) and `targets`, both sharing one vocabulary."""
  features = {'targets': seqio.Feature(vocabulary=vocabulary, add_eos=add_eos)}
  if inputs:
    features = {'inputs': seqio.Feature(vocabulary=vocabulary, add_eos=add_eos, required=False),
                **features}
  return features
