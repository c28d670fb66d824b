"""Pretraining tasks: T5 span corruption (encoder-decoder) and language modelling (decoder-only).

Three sources, each registered under both objectives:
  stdlib_*    the embedded corpus (default): this Python's own standard library sources, found with
              `sysconfig`, split into train/validation by a stable hash of each file's relative path;
  c4_*        C4 through TFDS (`c4/en:3.1.0`), when it is prepared;
  text_dir_*  any directory of text files, named by gin (`text_dir.path`) or $ST_MOE_TEXT_DIR;
              `register_text_dir_tasks(name, directory)` registers further directories under own names.
Names without a suffix use `seqio.ByteVocabulary`; the `_t5vocab` twins use the T5 SentencePiece model.

Lory's similarity batching (tasks/lory_batching.py): `stdlib_lm_similarity` and `text_dir_lm_similarity`
(+ `_t5vocab` twins) are the LM tasks with the split's documents (files, each with its segments in order)
put in similarity order first, so each packed sequence holds similar documents. Not registered for C4: the
step holds the whole split in memory.

Text files are cut into line-aligned segments of about `segment_chars` characters inside tf.data (pure TF
ops, so the iterator stays checkpointable); nothing is read before a dataset is iterated.
"""

import hashlib
import fnmatch
import functools
import os
import sysconfig
from typing import Callable, Mapping, Optional, Sequence, Union

import gin
import numpy as np
import seqio
import tensorflow as tf

from tasks import common
from tasks import lory_batching

SPLITS = ('train', 'validation')
VALIDATION_FRACTION = 0.05
SEGMENT_CHARS = 4096
# Training shuffles segments, not files: every segment of the split (a file cut by file_segments) is listed
# once, as (file, segment number), and the whole list is shuffled. A run that reads a third of the corpus
# then reads a uniform sample of it. Reading whole files one after another made consecutive batches share
# files; reading 64 files at a time mixed batches but gave each seed its own third of the standard library
# (a 4800-step run reads 9.8M of 30M bytes): dense models' validation bits/byte spread by 0.036 over seeds at
# 1200 steps, 0.009 with this. The checkpointed iterator holds the shuffled list (about 100 bytes a segment),
# not text. Each segment re-reads and re-cuts its file (14 ms a 16×128 batch on the stdlib, against 6 before).
# Name part of the LM tasks with Lory's similarity batching: stdlib_lm_similarity, ...
SIMILARITY_SUFFIX = '_similarity'
# Feature naming a segment's file, so that similarity batching orders whole files (documents), not segments.
DOCUMENT_KEY = 'path'
# Token chunk length when a task is asked for a dataset without sequence lengths.
DEFAULT_LENGTH = 512
NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
# Directories under the stdlib path that hold installed packages or caches, not the standard library.
STDLIB_EXCLUDE_DIRS = ('site-packages', 'dist-packages', '__pycache__')

# T5 used c4/en:3.0.1; the pinned tensorflow-datasets (4.9.10) builds only 3.1.0 among the 3.x versions.
C4_TFDS_NAME = 'c4/en:3.1.0'
C4_HOW_TO_GET = (
    f'Prepare C4 with TFDS (`tfds build {C4_TFDS_NAME}`; needs Apache Beam and about 800 GB) and pass '
    '--tfds_data_dir, or pretrain on the embedded corpus (stdlib_span_corruption / stdlib_lm) or on a '
    'directory of text files (text_dir_span_corruption with text_dir.path set).')


# ------------------------------------------------------------------------------------------------------
# Files and the deterministic split


def stdlib_dir() -> str:
  """Where this interpreter's standard library sources live."""
  return sysconfig.get_paths()['stdlib']


def list_text_files(root: str, patterns: Sequence[str] = ('*',),
                    exclude_dirs: Sequence[str] = ()) -> list[str]:
  """Relative POSIX paths of the files under `root` whose names match one of `patterns`, sorted.

  Hidden files and directories and any directory named in `exclude_dirs` are skipped.
  """
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and d not in exclude_dirs)
    for name in filenames:
      if name.startswith('.') or not any(fnmatch.fnmatch(name, p) for p in patterns):
        continue
      path = os.path.join(dirpath, name)
      if os.path.isfile(path):
        found.append(os.path.relpath(path, root).replace(os.sep, '/'))
  return sorted(found)


def split_of(relative_path: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
  """'validation' or 'train', decided by a stable hash of the path (same answer on every machine)."""
  digest = hashlib.sha256(relative_path.encode('utf-8')).digest()
  bucket = int.from_bytes(digest[:8], 'big') % 10_000
  return 'validation' if bucket < validation_fraction * 10_000 else 'train'


class TextFilesSource(seqio.DataSource):
  """Examples {'text': segment} from the text files under a directory.

  Splits are by file (`split_of`), so a file never straddles train and validation. The directory may be
  given as a callable, resolved when a dataset is first requested (e.g. from a gin binding).
  """

  def __init__(self, root: Union[str, Callable[[], str]], *, patterns: Sequence[str] = ('*',),
               exclude_dirs: Sequence[str] = (), validation_fraction: float = VALIDATION_FRACTION,
               segment_chars: int = SEGMENT_CHARS, max_files: Optional[int] = None,
               path_key: Optional[str] = None):
    """max_files caps the files per split (first in sorted order): small, fast runs and tests.

    path_key: also give each segment its file's relative path under this feature, so a later step can
    treat a file as one document (similarity batching does). None: only 'text'.
    """
    super().__init__(splits=SPLITS)
    self._root = root
    self._patterns = tuple(patterns)
    self._exclude_dirs = tuple(exclude_dirs)
    self._validation_fraction = validation_fraction
    self._segment_chars = segment_chars
    self._max_files = max_files
    self._path_key = path_key
    self._files_cache = {}

  @property
  def root(self) -> str:
    root = self._root() if callable(self._root) else self._root
    if not root or not os.path.isdir(root):
      raise common.MissingDataError(f'Text directory {root!r} does not exist or is not a directory.')
    return root

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def relative_files(self, split: str) -> list[str]:
    """The files of `split`, relative to the root, sorted (cached per root)."""
    if split not in SPLITS:
      raise ValueError(f'Unknown split {split!r}; this source has {SPLITS}.')
    root = self.root
    key = (root, split)
    if key not in self._files_cache:
      files = [f for f in list_text_files(root, self._patterns, self._exclude_dirs)
               if split_of(f, self._validation_fraction) == split]
      if self._max_files is not None:
        files = files[:self._max_files]
      if not files:
        raise common.MissingDataError(
            f'No {split} files matching {list(self._patterns)} under {root} (each file goes to train or '
            f'validation by a hash of its path, {self._validation_fraction:.0%} to validation; a '
            'directory needs a few dozen files to fill both).')
      self._files_cache[key] = files
    return self._files_cache[key]

  def list_shards(self, split: str) -> Sequence[str]:
    root = self.root
    return [os.path.join(root, f) for f in self.relative_files(split)]

  def get_dataset(self, split: str = 'train', shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # handled by the Task
    files = list(self.list_shards(split))
    if shard_info:
      files = files[shard_info.index::shard_info.num_shards]
    segment = functools.partial(file_segments, segment_chars=self._segment_chars)
    if self._path_key is not None:
      return self._segments_with_paths(split, files, shuffle, seed, shard_info, segment)
    if not shuffle:
      ds = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string))
      ds = ds.map(segment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
      return ds.map(lambda text: {'text': text})
    paths, numbers = self._segment_list(split, files)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(numbers, tf.int64)))
    ds = ds.shuffle(len(numbers), seed=seed, reshuffle_each_iteration=True)
    return ds.map(lambda path, number: {'text': segment(path)[number]},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def _segment_list(self, split: str, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every segment of `files` as (<string>[S] file path, <int64>[S] segment number), cached per split
    and file list (the files are read once to count their segments)."""
    key = ('segments', self.root, split, tuple(files))
    if key not in self._files_cache:
      segment = functools.partial(file_segments, segment_chars=self._segment_chars)
      counts = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string)).map(
          lambda path: tf.size(segment(path), out_type=tf.int64), num_parallel_calls=tf.data.AUTOTUNE,
          deterministic=True)
      counts = np.fromiter(counts.as_numpy_iterator(), np.int64, count=len(files))
      if not counts.sum():
        raise common.MissingDataError(f'The {split} files under {self.root} hold no text.')
      numbers = np.concatenate([np.arange(n) for n in counts])
      self._files_cache[key] = (np.repeat(np.asarray(files, object), counts), numbers)
    return self._files_cache[key]

  def _segments_with_paths(self, split, files, shuffle, seed, shard_info, segment) -> tf.data.Dataset:
    """As get_dataset, with each segment's relative file path under `path_key` (a file's segments stay
    together and in order)."""
    relative = list(self.relative_files(split))
    if shard_info:
      relative = relative[shard_info.index::shard_info.num_shards]
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(files, tf.string),
                                             tf.constant(relative, tf.string)))
    if shuffle:
      ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    def with_path(path, relative_path):
      texts = segment(path)
      return {'text': texts, self._path_key: tf.fill(tf.shape(texts), relative_path)}

    ds = ds.map(with_path, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.unbatch()


def file_segments(path: tf.Tensor, segment_chars: int = SEGMENT_CHARS) -> tf.Tensor:
  """<string>[S]: the file at `path` cut into line-aligned segments of about `segment_chars` characters.

  Invalid UTF-8 becomes U+FFFD so every vocabulary sees valid text. A line longer than a segment is cut
  at 2 * segment_chars characters, keeping every example bounded.
  """
  text = tf.strings.unicode_transcode(tf.io.read_file(path), 'UTF-8', 'UTF-8', errors='replace')
  lines = tf.strings.split(text, '\n')
  # A line belongs to the segment in which it starts.
  starts = tf.cumsum(tf.strings.length(lines, unit='UTF8_CHAR') + 1, exclusive=True)
  segment_ids = starts // segment_chars
  segments = tf.strings.unsorted_segment_join(lines, segment_ids, segment_ids[-1] + 1, separator='\n')
  segments = tf.strings.substr(segments, 0, 2 * segment_chars, unit='UTF8_CHAR')
  # Segment ids jump past a very long line, leaving empty segments; blank files give blank segments.
  return tf.boolean_mask(segments, tf.strings.length(tf.strings.strip(segments)) > 0)


# ------------------------------------------------------------------------------------------------------
# Preprocessors


def concat_and_split(dataset: tf.data.Dataset, feature_key: str, length: int,
                     batch_size: int = 128) -> tf.data.Dataset:
  """Concatenates the token sequences of `batch_size` consecutive examples and cuts them into pieces of
  `length` tokens (the last piece of each batch may be shorter). Other features are dropped.

  Packs documents densely, as T5's reduce_concat_tokens + split_tokens do.
  """
  dataset = dataset.map(lambda x: {feature_key: x[feature_key]})
  dataset = dataset.padded_batch(batch_size, padded_shapes={feature_key: [None]})

  def split(batch):
    tokens = tf.reshape(batch[feature_key], [-1])
    tokens = tf.boolean_mask(tokens, tokens != 0)  # 0 is padding in every seqio vocabulary
    n = tf.size(tokens)
    num_full = n // length
    row_lengths = tf.concat([tf.fill([num_full], length), tf.reshape(n % length, [1])], 0)
    row_lengths = tf.boolean_mask(row_lengths, row_lengths > 0)
    return {feature_key: tf.RaggedTensor.from_row_lengths(tokens, row_lengths)}

  return dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _target_length(sequence_length: Optional[Mapping[str, int]], key: str) -> int:
  if sequence_length and sequence_length.get(key):
    return int(sequence_length[key])
  return DEFAULT_LENGTH


def lm_chunks(dataset: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]] = None,
              output_features=None) -> tf.data.Dataset:
  """Language modelling: documents (EOS-terminated) packed into `targets` chunks of the target length."""
  del output_features
  return concat_and_split(dataset, 'targets', _target_length(sequence_length, 'targets'))


def span_corruption_lengths(inputs_length: int, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """(tokens_length, targets_length): the longest raw chunk whose corrupted inputs (kept tokens, one
  sentinel per noise span, EOS) fit in `inputs_length`, and the targets length it then needs.

  T5's choice: inputs_length 512 gives 568 raw tokens and 114 target tokens.
  """

  def corrupted_lengths(tokens_length):
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

  tokens_length = inputs_length - 1
  while corrupted_lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, corrupted_lengths(tokens_length)[1]


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """<int32>[num_segments]: a uniformly random split of num_items into num_segments positive parts."""
  # Choose num_segments - 1 of the num_items - 1 gaps between items as cut points.
  cuts = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  cuts = seqio.utils.stateless_shuffle(cuts, seed)
  segment_id = tf.cumsum(tf.concat([[0], cuts], 0))
  return tf.math.unsorted_segment_sum(tf.ones_like(segment_id), segment_id, num_segments)


def random_spans_noise_mask(length: tf.Tensor, seed: tf.Tensor, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tf.Tensor:
  """<bool>[length]: True on noise tokens; round(length * density) of them, in about
  noise/mean_span_length spans, at random places. The sequence always starts with kept tokens.
  """
  orig_length = length
  length = tf.maximum(length, 2)  # a one-token sequence still needs a kept and a noise position
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
  num_spans = tf.maximum(num_spans, 1)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  kept_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])
  # Alternate kept, noise, kept, noise, ...: span k (0-based) is noise when k is odd.
  span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
  span_starts = tf.cumsum(span_lengths)[:-1]
  starts_here = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts, length)
  is_noise = tf.math.floormod(tf.cumsum(starts_here), 2) == 1
  return is_noise[:orig_length]


def replace_spans_with_sentinels(tokens: tf.Tensor, span_mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
  """Each run of True in `span_mask` becomes one sentinel; sentinel i is id vocab_size - 1 - i.

  With T5's SentencePiece vocabulary that is <extra_id_i>; with bytes, the top byte ids (ByT5).
  """
  previous = tf.concat([[False], span_mask[:-1]], 0)
  first = tf.logical_and(span_mask, tf.logical_not(previous))
  rest = tf.logical_and(span_mask, previous)
  sentinels = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
  tokens = tf.where(first, sentinels, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(rest))


@seqio.map_over_dataset(num_seeds=1)
def _corrupt_spans(x, seed, vocab_size, noise_density, mean_noise_span_length):
  tokens = x['targets']
  noise = random_spans_noise_mask(tf.size(tokens), seed, noise_density, mean_noise_span_length)
  return {'inputs': replace_spans_with_sentinels(tokens, noise, vocab_size),
          'targets': replace_spans_with_sentinels(tokens, tf.logical_not(noise), vocab_size)}


def span_corruption(dataset: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]] = None,
                    output_features: Optional[Mapping[str, seqio.Feature]] = None,
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tf.data.Dataset:
  """T5 span corruption of tokenized `targets` into `inputs` (text with sentinels) and `targets`
  (sentinel, dropped span, sentinel, ...). Chunks are sized so the inputs fill the inputs length.
  """
  tokens_length, _ = span_corruption_lengths(_target_length(sequence_length, 'inputs'), noise_density,
                                             mean_noise_span_length)
  dataset = concat_and_split(dataset, 'targets', tokens_length)
  vocab_size = output_features['targets'].vocabulary.vocab_size
  return _corrupt_spans(dataset, vocab_size=vocab_size, noise_density=noise_density,
                        mean_noise_span_length=mean_noise_span_length)


def span_corruption_preprocessors() -> list:
  return [
      functools.partial(seqio.preprocessors.rekey, key_map={'targets': 'text'}),
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      seqio.CacheDatasetPlaceholder(),
      span_corruption,
      seqio.preprocessors.append_eos_after_trim,
  ]


def lm_preprocessors() -> list:
  return [
      functools.partial(seqio.preprocessors.rekey, key_map={'targets': 'text'}),
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      # EOS ends each document before documents are packed, so the model sees where texts end.
      seqio.preprocessors.append_eos,
      seqio.CacheDatasetPlaceholder(),
      lm_chunks,
  ]


@gin.configurable
def similarity_k(k: int = lory_batching.DEFAULT_K) -> int:
  """Neighbours per document in the kNN graph of the *_lm_similarity tasks (gin `similarity_k.k`).

  Read when a dataset is built, so a gin binding applies to the tasks registered at import.
  """
  return k


def lm_similarity_preprocessors(k: Union[int, Callable[[], int]] = similarity_k,
                                group_key: Optional[str] = None) -> list:
  """`lm_preprocessors` preceded by Lory's similarity ordering of the split's documents.

  The documents (with group_key: all segments of a file, in file order; without: each source example)
  are ordered on their raw text, then tokenized, EOS-terminated per segment as in `*_lm`, and concatenated
  in that order by `lm_chunks`. seqio's task shuffle, when on, shuffles the resulting sequences, never the
  documents inside one.
  """
  return [functools.partial(lory_batching.order_by_similarity, k=k, group_key=group_key),
          *lm_preprocessors()]


# ------------------------------------------------------------------------------------------------------
# Unigram baseline


def byte_counts(paths: Sequence[str]) -> np.ndarray:
  """<int64>[256]: byte histogram of the files, after the same UTF-8 repair the tasks apply."""
  counts = np.zeros(256, np.int64)
  for path in paths:
    with open(path, 'rb') as f:
      data = f.read().decode('utf-8', errors='replace').encode('utf-8')
    counts += np.bincount(np.frombuffer(data, np.uint8), minlength=256)
  return counts


def unigram_bits_per_byte(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
  """Cross-entropy in bits per byte of `eval_counts` under a unigram model fitted on `train_counts`
  (add-one smoothing, so bytes unseen in train cost finite bits)."""
  probs = (train_counts + 1) / (train_counts.sum() + train_counts.size)
  return float(-(eval_counts * np.log2(probs)).sum() / max(eval_counts.sum(), 1))


def unigram_byte_baseline(source: Optional[TextFilesSource] = None) -> float:
  """Bits per byte of a unigram byte model fitted on the train files, measured on validation files.

  The floor a byte-level model must beat to have learned anything beyond byte frequencies. Default:
  the embedded corpus (about 30 MB; a second or so).
  """
  source = source or STDLIB_SOURCE
  return unigram_bits_per_byte(byte_counts(source.list_shards('train')),
                               byte_counts(source.list_shards('validation')))


# ------------------------------------------------------------------------------------------------------
# Registration


@gin.configurable
def text_dir(path: Optional[str] = None) -> str:
  """The directory read by the text_dir_* tasks: gin `text_dir.path`, else $ST_MOE_TEXT_DIR."""
  path = path or os.environ.get('ST_MOE_TEXT_DIR')
  if not path:
    raise common.MissingDataError(
        'The text_dir_* tasks read the directory given by gin `text_dir.path` (e.g. '
        "--gin.text_dir.path=\"'/data/my_texts'\") or the environment variable ST_MOE_TEXT_DIR; "
        'neither is set.')
  return path


def register_pretraining_tasks(prefix: str, source: seqio.DataSource,
                               vocabulary: Optional[seqio.Vocabulary] = None,
                               suffix: str = '') -> list[str]:
  """Registers `{prefix}_span_corruption{suffix}` and `{prefix}_lm{suffix}` over `source` (replacing
  earlier registrations of those names). Returns the names."""
  vocabulary = vocabulary or common.default_vocabulary()
  names = [f'{prefix}_span_corruption{suffix}', f'{prefix}_lm{suffix}']
  for name in names:
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      names[0], source=source, preprocessors=span_corruption_preprocessors(),
      output_features=common.output_features(vocabulary), metric_fns=[])
  seqio.TaskRegistry.add(
      names[1], source=source, preprocessors=lm_preprocessors(),
      output_features=common.output_features(vocabulary, inputs=False), metric_fns=[])
  return names


def register_similarity_lm_task(prefix: str, source: seqio.DataSource,
                                vocabulary: Optional[seqio.Vocabulary] = None, suffix: str = '',
                                k: Optional[int] = None, group_key: Optional[str] = None) -> str:
  """Registers `{prefix}_lm_similarity{suffix}`: `{prefix}_lm{suffix}` with similarity batching (replacing
  an earlier registration of that name). Returns the name.

  k: neighbours per document in the similarity graph; None reads gin `similarity_k.k` (default 10) when a
    dataset is built.
  group_key: the source feature that names an example's document (a TextFilesSource's `path_key`: files
    are the documents); None: every example is a document.
  """
  vocabulary = vocabulary or common.default_vocabulary()
  name = f'{prefix}_lm{SIMILARITY_SUFFIX}{suffix}'
  preprocessors = lm_similarity_preprocessors(similarity_k if k is None else lory_batching.check_k(k),
                                              group_key)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                         output_features=common.output_features(vocabulary, inputs=False), metric_fns=[])
  return name


def register_text_dir_tasks(name: str, directory: Union[str, Callable[[], str]],
                            patterns: Sequence[str] = ('*',),
                            vocabulary: Optional[seqio.Vocabulary] = None,
                            validation_fraction: float = VALIDATION_FRACTION,
                            max_files: Optional[int] = None, similarity: bool = False) -> list[str]:
  """Registers `{name}_span_corruption` and `{name}_lm` over the files in `directory` whose names match
  `patterns` (e.g. ('*.txt', '*.md')), and with `similarity` also `{name}_lm_similarity` (files in
  similarity order, see `register_similarity_lm_task`). Returns the task names."""
  kwargs = dict(patterns=patterns, validation_fraction=validation_fraction, max_files=max_files)
  names = register_pretraining_tasks(name, TextFilesSource(directory, **kwargs), vocabulary)
  if similarity:
    source = TextFilesSource(directory, path_key=DOCUMENT_KEY, **kwargs)
    names.append(register_similarity_lm_task(name, source, vocabulary, group_key=DOCUMENT_KEY))
  return names


STDLIB_SOURCE = TextFilesSource(stdlib_dir, patterns=('*.py',), exclude_dirs=STDLIB_EXCLUDE_DIRS)
C4_SOURCE = common.GuardedTfdsSource(C4_TFDS_NAME, splits=SPLITS, how_to_get=C4_HOW_TO_GET)
TEXT_DIR_SOURCE = TextFilesSource(text_dir)
# The same files for similarity batching, where a document is a file: each segment carries its file's path.
STDLIB_FILES_SOURCE = TextFilesSource(stdlib_dir, patterns=('*.py',), exclude_dirs=STDLIB_EXCLUDE_DIRS,
                                      path_key=DOCUMENT_KEY)
TEXT_DIR_FILES_SOURCE = TextFilesSource(text_dir, path_key=DOCUMENT_KEY)

for _suffix, _vocabulary in (('', common.default_vocabulary()),
                             (common.T5_VOCAB_SUFFIX, common.sentencepiece_vocabulary())):
  register_pretraining_tasks('stdlib', STDLIB_SOURCE, _vocabulary, _suffix)
  register_pretraining_tasks('c4', C4_SOURCE, _vocabulary, _suffix)
  register_pretraining_tasks('text_dir', TEXT_DIR_SOURCE, _vocabulary, _suffix)
  for _prefix, _source in (('stdlib', STDLIB_FILES_SOURCE), ('text_dir', TEXT_DIR_FILES_SOURCE)):
    register_similarity_lm_task(_prefix, _source, _vocabulary, _suffix, group_key=DOCUMENT_KEY)
