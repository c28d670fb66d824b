"""SuperGLUE (plus the AX-b and AX-g diagnostics) as T5 text-to-text seqio tasks.

Task names are t5's: super_glue_{boolq,cb,copa,multirc,record,rte,wic,axb,axg}_v102,
super_glue_wsc_v102_simple_train / _simple_eval, and the mixture super_glue_v102_proportional.
They use `seqio.ByteVocabulary`; the `_t5vocab` twins use the T5 SentencePiece vocabulary.

Data comes from one of two sources that give identical examples (features, dtypes, values):
  * SUPERGLUE_DIR (gin `superglue_dir.path`, else the environment variable): a directory with the official
    JSONL files (BoolQ/train.jsonl, BoolQ/val.jsonl, BoolQ/test.jsonl, ..., AX-b/AX-b.jsonl), read here
    and flattened exactly as the TFDS builder flattens them;
  * otherwise TFDS `super_glue/<config>:1.0.2`, which must already be prepared (never downloaded here).

Leaderboard files: `submission_records` / `write_submission` turn (example, prediction) pairs into the
official per-task JSONL (BoolQ.jsonl, ..., AX-g.jsonl).
"""

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from st_moe_jax import fileio
from tasks import common
from tasks import superglue_metrics as metrics

TFDS_VERSION = '1.0.2'
# Where the official distribution lives; JSONL split file names.
OFFICIAL_URL = 'https://super.gluebenchmark.com/tasks'
SPLIT_FILES = {'train': 'train.jsonl', 'validation': 'val.jsonl', 'test': 'test.jsonl'}
BOOL_LABELS = ('False', 'True')
NLI_LABELS = ('entailment', 'not_entailment')


@dataclasses.dataclass(frozen=True)
class Config:
  """One TFDS super_glue config: its official directory, text fields and label names."""
  name: str
  directory: str
  text_fields: tuple[str, ...]
  labels: tuple[str, ...] = BOOL_LABELS
  int_fields: tuple[str, ...] = ()
  test_only: bool = False


CONFIGS = {c.name: c for c in (
    Config('boolq', 'BoolQ', ('question', 'passage')),
    Config('cb', 'CB', ('premise', 'hypothesis'), ('entailment', 'contradiction', 'neutral')),
    Config('copa', 'COPA', ('premise', 'choice1', 'choice2', 'question'), ('choice1', 'choice2')),
    Config('multirc', 'MultiRC', ('paragraph', 'question', 'answer')),
    Config('record', 'ReCoRD', ('passage', 'query'), labels=()),
    Config('rte', 'RTE', ('premise', 'hypothesis'), NLI_LABELS),
    Config('wic', 'WiC', ('word', 'sentence1', 'sentence2'),
           int_fields=('start1', 'start2', 'end1', 'end2')),
    Config('wsc', 'WSC', ('text', 'span1_text', 'span2_text'), int_fields=('span1_index', 'span2_index')),
    Config('wsc.fixed', 'WSC', ('text', 'span1_text', 'span2_text'),
           int_fields=('span1_index', 'span2_index')),
    Config('axb', 'AX-b', ('sentence1', 'sentence2'), NLI_LABELS, test_only=True),
    Config('axg', 'AX-g', ('premise', 'hypothesis'), NLI_LABELS, test_only=True),
)}


def config_splits(config: Config) -> tuple[str, ...]:
  return ('test',) if config.test_only else ('train', 'validation', 'test')


# ------------------------------------------------------------------------------------------------------
# Where the data is


@gin.configurable
def superglue_dir(path: Optional[str] = None) -> Optional[str]:
  """The official JSONL directory: gin `superglue_dir.path`, else $SUPERGLUE_DIR; None means TFDS."""
  return path or os.environ.get('SUPERGLUE_DIR') or None


def how_to_get(config: Config) -> str:
  return (
      f'Get SuperGLUE in one of two ways: (1) download the official data from {OFFICIAL_URL} (e.g. '
      f'https://dl.fbaipublicfiles.com/glue/superglue/data/v2/{config.directory}.zip), unzip it and set '
      'SUPERGLUE_DIR '
      f'(or gin superglue_dir.path) to the directory holding {config.directory}/'
      f'{_file_names(config)[0]}; or (2) prepare TFDS with network access: python -c "import '
      f"tensorflow_datasets as tfds; tfds.builder('super_glue/{config.name}:{TFDS_VERSION}')"
      '.download_and_prepare()" (use --tfds_data_dir if it is not in ~/tensorflow_datasets).')


def _file_names(config: Config) -> list[str]:
  if config.test_only:
    return [f'{config.directory}.jsonl']
  return list(SPLIT_FILES.values())


def jsonl_path(root: str, config: Config, split: str) -> str:
  """The official file for (config, split) under `root`.

  Layouts: <root>/<Task>/<split>.jsonl as the zips unpack; the diagnostics also as <root>/AX-b.jsonl.
  """
  if split not in config_splits(config):
    raise ValueError(f'super_glue/{config.name} has no {split!r} split; it has {config_splits(config)}.')
  if config.test_only:
    candidates = [os.path.join(root, config.directory, f'{config.directory}.jsonl'),
                  os.path.join(root, f'{config.directory}.jsonl')]
  else:
    candidates = [os.path.join(root, config.directory, SPLIT_FILES[split])]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise common.MissingDataError(
      f'SuperGLUE {config.directory} {split} data not found: SUPERGLUE_DIR={root!r} has no '
      f'{" or ".join(candidates)}. {how_to_get(config)}')


# ------------------------------------------------------------------------------------------------------
# Reading the official JSONL into the TFDS builder's flattened features


def _label_id(config: Config, value: Any, where: str) -> int:
  """The TFDS ClassLabel id of an official label value."""
  if config.name == 'copa':
    if value not in (0, 1) or isinstance(value, bool):
      raise common.MalformedDataError(f'{where}: COPA label must be 0 or 1, got {value!r}.')
    return int(value)  # 1 → choice2
  if isinstance(value, bool):
    value = str(value)
  if value not in config.labels:
    raise common.MalformedDataError(
        f'{where}: label {value!r} is not one of {list(config.labels)} for {config.directory}.')
  return config.labels.index(value)


def _fix_wsc_span(example: dict, span: str):
  """The wsc.fixed repair (as TFDS applies it): a span text that is not a substring of the text gets
  the capitalisation of the word it starts at, loses a trailing period and embedded newlines."""
  text, index = example[f'{span}_text'], example[f'{span}_index']
  if text in example['text'] or text in ('Kamenev and Zinoviev', 'Kamenev, Zinoviev, and Stalin'):
    return  # fine already, or beyond repair (TFDS keeps these as they are)
  if 'theyscold' in text:
    example['span2_index'] = 10
  first_word = example['text'].split()[index]
  text = (text[0].lower() if first_word[0].islower() else text[0].upper()) + text[1:]
  example[f'{span}_text'] = text.rstrip('.').replace('\n', ' ')


def flatten_row(config: Config, row: Mapping[str, Any], split: str, where: str) -> list[dict]:
  """One official JSONL row → the TFDS example(s) it becomes (MultiRC: one per answer; ReCoRD: one per
  query). A missing label gives -1, allowed only in the test split."""

  def label(value_holder, key='label'):
    if key in value_holder and value_holder[key] is not None:
      return value_holder[key]
    if split != 'test':
      raise common.MalformedDataError(f'{where}: no {key!r} in a {split} example.')
    return None

  if config.name == 'multirc':
    passage = row['passage']
    examples = []
    for question in passage['questions']:
      for answer in question['answers']:
        value = label(answer)
        examples.append({
            'paragraph': passage['text'], 'question': question['question'], 'answer': answer['text'],
            'label': -1 if value is None else _label_id(config, bool(value), where),
            'idx': {'paragraph': row['idx'], 'question': question['idx'], 'answer': answer['idx']},
        })
    return examples
  if config.name == 'record':
    passage = row['passage']
    text = passage['text']
    # Entity spans are inclusive of `end`.
    entities = sorted({text[e['start']:e['end'] + 1] for e in passage['entities']})
    return [{'passage': text, 'query': qa['query'], 'entities': entities,
             'answers': sorted({a['text'] for a in qa.get('answers', [])}),
             'idx': {'passage': row['idx'], 'query': qa['idx']}} for qa in row['qas']]
  if config.name.startswith('wsc'):
    row = {**row, **row['target']}
  example = {f: row[f] for f in config.text_fields + config.int_fields}
  if config.name == 'wsc.fixed':
    _fix_wsc_span(example, 'span1')
    _fix_wsc_span(example, 'span2')
  example['idx'] = row['idx']
  value = label(row)
  example['label'] = -1 if value is None else _label_id(config, value, where)
  return [example]


def read_jsonl(path: str) -> list[tuple[int, dict]]:
  """(line number, object) for every non-blank line; MalformedDataError names file and line."""
  rows = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise common.MalformedDataError(f'{path}:{number}: not valid JSON ({e.msg}).') from None
      if not isinstance(row, dict):
        raise common.MalformedDataError(f'{path}:{number}: expected a JSON object, got {type(row).__name__}.')
      rows.append((number, row))
  return rows


def read_examples(root: str, config_name: str, split: str) -> list[dict]:
  """The TFDS-equivalent examples of one split, read from the official JSONL under `root`."""
  config = CONFIGS[config_name]
  path = jsonl_path(root, config, split)
  stat = os.stat(path)
  return _read_examples_cached(path, stat.st_mtime_ns, stat.st_size, config_name, split)


@functools.lru_cache(maxsize=32)
def _read_examples_cached(path, mtime_ns, size, config_name, split) -> list[dict]:
  del mtime_ns, size  # only part of the cache key, so an edited file is read again
  config = CONFIGS[config_name]
  examples = []
  for number, row in read_jsonl(path):
    where = f'{path}:{number}'
    try:
      examples += flatten_row(config, row, split, where)
    except (KeyError, TypeError, IndexError) as e:
      raise common.MalformedDataError(
          f'{where}: not an official {config.directory} row ({type(e).__name__}: {e}).') from None
  return examples


def feature_spec(config: Config) -> dict:
  """The tf.TypeSpec of a TFDS super_glue/<config> example."""
  spec = {f: tf.TensorSpec([], tf.string) for f in config.text_fields}
  spec.update({f: tf.TensorSpec([], tf.int32) for f in config.int_fields})
  if config.name == 'multirc':
    spec['idx'] = {k: tf.TensorSpec([], tf.int32) for k in ('paragraph', 'question', 'answer')}
  elif config.name == 'record':
    spec['idx'] = {k: tf.TensorSpec([], tf.int32) for k in ('passage', 'query')}
  else:
    spec['idx'] = tf.TensorSpec([], tf.int32)
  if config.name == 'record':
    spec['entities'] = tf.TensorSpec([None], tf.string)
    spec['answers'] = tf.TensorSpec([None], tf.string)
  else:
    spec['label'] = tf.TensorSpec([], tf.int64)
  return spec


def examples_to_dataset(examples: Sequence[dict], config: Config) -> tf.data.Dataset:
  """In-memory examples → tf.data with the TFDS element spec (from tensors, so it checkpoints)."""
  spec = feature_spec(config)

  def column(path, leaf_spec):
    values = [functools.reduce(lambda d, k: d[k], path, ex) for ex in examples]
    if leaf_spec.shape.rank == 1:
      return tf.ragged.constant(values, dtype=leaf_spec.dtype, ragged_rank=1) if values else (
          tf.zeros([0, 0], leaf_spec.dtype))
    return tf.constant(values, dtype=leaf_spec.dtype, shape=[len(values)])

  columns = {k: ({kk: column((k, kk), s) for kk, s in v.items()} if isinstance(v, dict)
                 else column((k,), v)) for k, v in spec.items()}
  ds = tf.data.Dataset.from_tensor_slices(columns)
  # Slices of a ragged column arrive as rank-0-ragged values; make them plain tensors like TFDS's.
  return ds.map(lambda x: tf.nest.map_structure(tf.convert_to_tensor, x))


class SuperGlueSource(seqio.DataSource):
  """super_glue/<config> from SUPERGLUE_DIR's JSONL when set (or `data_dir` when given), else TFDS."""

  def __init__(self, config_name: str, splits: Sequence[str], data_dir: Optional[str] = None):
    super().__init__(splits=splits)
    self._config = CONFIGS[config_name]
    self._data_dir = data_dir
    self._tfds = common.GuardedTfdsSource(f'super_glue/{config_name}:{TFDS_VERSION}', splits=splits,
                                          how_to_get=how_to_get(self._config))

  @property
  def config(self) -> Config:
    return self._config

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]  # one shard: the Task shards the examples when asked for more

  def get_dataset(self, split: str = 'train', shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # handled by the Task
    root = self._data_dir or superglue_dir()
    if not root:
      return self._tfds.get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info)
    if not os.path.isdir(root):
      raise common.MissingDataError(
          f'SUPERGLUE_DIR={root!r} is not a directory. {how_to_get(self._config)}')
    examples = read_examples(root, self._config.name, split)
    ds = examples_to_dataset(examples, self._config)
    if shard_info:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    if shuffle:
      ds = ds.shuffle(max(len(examples), 1), seed=seed, reshuffle_each_iteration=True)
    return ds


# ------------------------------------------------------------------------------------------------------
# T5 text-to-text preprocessors


def glue_text(x: Mapping[str, tf.Tensor], benchmark_name: str, label_names: Sequence[str],
              feature_names: Optional[Sequence[str]] = None) -> dict:
  """`<benchmark> key1: value1 key2: value2 ...` → label name (`<unk>` for label -1), t5's glue format.

  Keys are `feature_names`, or every feature but label and idx in sorted order.
  """
  keys = feature_names or sorted(set(x.keys()) - {'label', 'idx'})
  parts = [benchmark_name]
  for key in keys:
    parts += [f'{key}:', x[key]]
  inputs = tf.strings.join(parts, separator=' ')
  label = x['label']
  targets = tf.where(label < 0, tf.constant('<unk>'),
                     tf.gather(tf.constant(list(label_names)), tf.maximum(label, 0)))
  example = {'inputs': inputs, 'targets': targets}
  if benchmark_name == 'multirc':
    # The passage carries HTML sentence markup: <br> between sentences, <b>Sent N: </b> labels.
    inputs = tf.strings.regex_replace(inputs, '<br>', ' ')
    example['inputs'] = tf.strings.regex_replace(inputs, '<(/)?b>', '')
    for key in ('paragraph', 'question', 'answer'):
      example[f'idx/{key}'] = x['idx'][key]
  else:
    example['idx'] = x['idx']
  return example


def rekey_axb(x: Mapping[str, tf.Tensor]) -> dict:
  """AX-b is evaluated as RTE: sentence1 is the premise, sentence2 the hypothesis."""
  return {'premise': x['sentence1'], 'hypothesis': x['sentence2'], 'label': x['label'], 'idx': x['idx']}


def record_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """ReCoRD → `record query: <q> entities: e1, e2 passage: <p>`, one example per gold answer (one with
  target `<unk>` when there are none). Keeps `answers` and `idx/passage`, `idx/query` for the metric."""

  def per_query(x):
    passage = tf.strings.regex_replace(x['passage'], r'(\.|\?|\!|\"|\')\n@highlight\n', r'\1 ')
    passage = tf.strings.regex_replace(passage, r'\n@highlight\n', '. ')
    inputs = tf.strings.join(['record query:', x['query'], 'entities:',
                              tf.strings.reduce_join(x['entities'], separator=', '), 'passage:', passage],
                             separator=' ')
    answers = x['answers']
    targets = tf.cond(tf.size(answers) > 0, lambda: answers, lambda: tf.constant(['<unk>']))
    n = tf.size(targets)
    return {
        'inputs': tf.fill([n], inputs),
        'targets': targets,
        'answers': tf.tile(answers[tf.newaxis], [n, 1]),
        'idx/passage': tf.fill([n], x['idx']['passage']),
        'idx/query': tf.fill([n], x['idx']['query']),
    }

  return dataset.map(per_query, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def wsc_marked_text(text: tf.Tensor, pronoun_index: tf.Tensor, pronoun: tf.Tensor) -> tf.Tensor:
  """The text with the pronoun wrapped in asterisks: `... because *they* feared ...`.

  The pronoun is the space-separated word at `pronoun_index`; when the data's index is off, the nearest
  word starting with the pronoun. Punctuation glued to it is split off (`*him* ,"`).
  """
  words = tf.strings.split(text, ' ')
  n = tf.size(words)
  index = tf.clip_by_value(tf.cast(pronoun_index, tf.int32), 0, n - 1)
  length = tf.strings.length(pronoun)
  starts_with = tf.strings.substr(words, tf.zeros([n], tf.int32), tf.fill([n], length)) == pronoun
  distance = tf.abs(tf.range(n) - index) + tf.where(starts_with, 0, n + 1)
  index = tf.cast(tf.argmin(distance), tf.int32)
  word = words[index]
  rest = tf.strings.substr(word, length, tf.maximum(tf.strings.length(word) - length, 0))
  marked = tf.where(
      starts_with[index],
      tf.strings.join(['*', pronoun, '*', tf.where(rest == '', '', tf.strings.join([' ', rest]))]),
      tf.strings.join(['*', word, '*']))
  words = tf.tensor_scatter_nd_update(words, [[index]], [marked])
  return tf.strings.reduce_join(words, separator=' ')


def wsc_simple(dataset: tf.data.Dataset, correct_referent_only: bool = False) -> tf.data.Dataset:
  """WSC → `wsc: <text with *pronoun*>` with the candidate referent (span1_text) as target.

  The label says whether that candidate is right; for training keep only right ones.
  """
  if correct_referent_only:
    dataset = dataset.filter(lambda x: x['label'] == 1)

  def to_text(x):
    return {
        'inputs': tf.strings.join(['wsc:', wsc_marked_text(x['text'], x['span2_index'], x['span2_text'])],
                                  separator=' '),
        'targets': x['span1_text'],
        'label': x['label'],
        'idx': x['idx'],
    }

  return dataset.map(to_text, num_parallel_calls=tf.data.AUTOTUNE)


def text_preprocessors(config: Config) -> list:
  """The t5 text preprocessor(s) of a config (WSC excluded: see wsc_simple)."""
  map_fn = seqio.map_over_dataset
  if config.name == 'record':
    return [record_text]
  if config.name == 'axb':
    return [map_fn(rekey_axb), map_fn(functools.partial(glue_text, benchmark_name='rte',
                                                        label_names=config.labels))]
  benchmark = 'rte' if config.name == 'axg' else config.name
  feature_names = {'multirc': ('question', 'answer', 'paragraph'),
                   'wic': ('sentence1', 'sentence2', 'word')}.get(config.name)
  return [map_fn(functools.partial(glue_text, benchmark_name=benchmark, label_names=config.labels,
                                   feature_names=feature_names))]


# ------------------------------------------------------------------------------------------------------
# Postprocessors (seqio signature: output_or_target, example=None, is_target=False)


def string_label_to_class_id(string_label: str, example=None, is_target=False,
                             label_classes: Sequence[str] = BOOL_LABELS) -> int:
  """Index of the label string in `label_classes`, -1 when it is none of them."""
  del example, is_target
  string_label = common.text_of(string_label)
  return label_classes.index(string_label) if string_label in label_classes else -1


def multirc_postprocess(string_label: str, example=None, is_target=False) -> dict:
  """{'value': class id}, plus the question group (paragraph idx, question idx) on targets."""
  result = {'value': string_label_to_class_id(string_label)}
  if is_target:
    result['group'] = (int(example['idx/paragraph']), int(example['idx/question']))
  return result


def record_postprocess(answer: str, example=None, is_target=False) -> dict:
  """Targets: {'value': every gold answer, 'group': (passage idx, query idx)}; predictions: {'value'}."""
  if is_target:
    return {'value': [common.text_of(a) for a in example['answers']],
            'group': (int(example['idx/passage']), int(example['idx/query']))}
  return {'value': common.text_of(answer)}


def wsc_simple_postprocess(prediction: str, example=None, is_target=False) -> int:
  """Targets: the example's 0/1 label; predictions: whether the predicted text names the candidate."""
  if is_target:
    return int(example['label'])
  return metrics.wsc_referent_match(common.text_of(prediction),
                                    common.text_of(example['targets_pretokenized']))


def metric_fns(config_name: str) -> list:
  if config_name == 'cb':
    return [metrics.mean_3class_f1, metrics.accuracy]
  if config_name == 'multirc':
    return [metrics.multirc_f1_over_all_answers, metrics.multirc_exact_match]
  if config_name == 'record':
    return [metrics.record_em_f1]
  if config_name == 'axb':
    return [metrics.matthews_corrcoef]
  return [metrics.accuracy]


def postprocess_fn(config: Config):
  if config.name == 'multirc':
    return multirc_postprocess
  if config.name == 'record':
    return record_postprocess
  return functools.partial(string_label_to_class_id, label_classes=config.labels)


# ------------------------------------------------------------------------------------------------------
# Registration


def task_name(config_name: str, suffix: str = '') -> str:
  return f'super_glue_{config_name}_v{TFDS_VERSION.replace(".", "")}{suffix}'


WSC_TRAIN = 'super_glue_wsc_v102_simple_train'
WSC_EVAL = 'super_glue_wsc_v102_simple_eval'
MIXTURE = 'super_glue_v102_proportional'

# t5's rates (train-set sizes; ReCoRD and MultiRC counted after flattening). dpr_v001_simple (1322) is
# left out: DPR is not part of the SuperGLUE distribution, so the mixture would need a second dataset
# that SUPERGLUE_DIR cannot provide.
MIXTURE_RATES = {
    WSC_TRAIN: 259., WSC_EVAL: 0.,
    task_name('boolq'): 9_427., task_name('cb'): 250., task_name('copa'): 400.,
    task_name('multirc'): 27_243., task_name('record'): 138_854., task_name('rte'): 2_490.,
    task_name('wic'): 5_428., task_name('axb'): 0., task_name('axg'): 0.,
}

# Task → leaderboard file.
SUBMISSION_FILES = {
    task_name('boolq'): 'BoolQ.jsonl', task_name('cb'): 'CB.jsonl', task_name('copa'): 'COPA.jsonl',
    task_name('multirc'): 'MultiRC.jsonl', task_name('record'): 'ReCoRD.jsonl',
    task_name('rte'): 'RTE.jsonl', task_name('wic'): 'WiC.jsonl', WSC_EVAL: 'WSC.jsonl',
    task_name('axb'): 'AX-b.jsonl', task_name('axg'): 'AX-g.jsonl',
}


def _add(name: str, source: seqio.DataSource, text_preprocessors_: list, vocabulary: seqio.Vocabulary,
         **kwargs):
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=text_preprocessors_ + [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                                           seqio.preprocessors.append_eos_after_trim],
      output_features=common.output_features(vocabulary), **kwargs)


def register_superglue_tasks(vocabulary: Optional[seqio.Vocabulary] = None, suffix: str = '',
                             data_dir: Optional[str] = None) -> list[str]:
  """Registers every task and the mixture with names ending in `suffix` (replacing earlier ones).

  data_dir fixes the JSONL directory (tests); None reads SUPERGLUE_DIR / TFDS when a dataset is built.
  Returns the task names.
  """
  vocabulary = vocabulary or common.default_vocabulary()
  names = []
  for config in CONFIGS.values():
    if config.name.startswith('wsc'):
      continue  # WSC is trained and evaluated in the simple referent format below
    name = task_name(config.name, suffix)
    _add(name, SuperGlueSource(config.name, config_splits(config), data_dir),
         text_preprocessors(config), vocabulary, metric_fns=metric_fns(config.name),
         postprocess_fn=postprocess_fn(config))
    names.append(name)
  _add(WSC_TRAIN + suffix, SuperGlueSource('wsc.fixed', ['train'], data_dir),
       [functools.partial(wsc_simple, correct_referent_only=True)], vocabulary, metric_fns=[])
  _add(WSC_EVAL + suffix, SuperGlueSource('wsc.fixed', ['validation', 'test'], data_dir),
       [functools.partial(wsc_simple, correct_referent_only=False)], vocabulary,
       metric_fns=[metrics.accuracy], postprocess_fn=wsc_simple_postprocess)
  names += [WSC_TRAIN + suffix, WSC_EVAL + suffix]
  if MIXTURE + suffix in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(MIXTURE + suffix)
  seqio.MixtureRegistry.add(MIXTURE + suffix, [(name + suffix, rate) for name, rate in MIXTURE_RATES.items()])
  return names


# ------------------------------------------------------------------------------------------------------
# Leaderboard submission files


def _base_task_name(name: str) -> str:
  for base in SUBMISSION_FILES:
    if name == base or name.startswith(base + '_'):
      return base
  raise ValueError(f'{name!r} has no SuperGLUE submission file; tasks that have: {sorted(SUBMISSION_FILES)}.')


def invalid_predictions(task: str, predictions: Sequence[str]) -> list[str]:
  """The predictions of a labelled task (not ReCoRD's free answers or WSC's spans) that are none of its
  labels; the submission writes each as the first label (every test example needs one), so the caller
  reports them."""
  base = _base_task_name(task)
  if base in (task_name('record'), WSC_EVAL):
    return []
  labels = BOOL_LABELS if base == task_name('multirc') else CONFIGS[base[len('super_glue_'):-len('_v102')]].labels
  return [common.text_of(p) for p in predictions if common.text_of(p) not in labels]


def submission_records(task: str, examples: Sequence[Mapping[str, Any]],
                       predictions: Sequence[str]) -> list[dict]:
  """The leaderboard JSONL records of one task, from its test examples and decoded predictions.

  An invalid prediction becomes the task's first label, since every test example needs one
  (`invalid_predictions` lists them, for the caller to report).
  Formats: {"idx", "label"} with label strings (CB, RTE, AX-b, AX-g), lower-case "true"/"false" (BoolQ,
  WiC), "True"/"False" (WSC) or the class id (COPA); ReCoRD {"idx": query idx, "label": answer};
  MultiRC one record per paragraph {"idx", "passage": {"questions": [{"idx", "answers": [{"idx",
  "label": 0|1}]}]}}.
  """
  base = _base_task_name(task)
  if len(examples) != len(predictions):
    raise ValueError(f'{len(examples)} examples but {len(predictions)} predictions for {task}.')
  pairs = list(zip(examples, (common.text_of(p) for p in predictions)))
  if base == task_name('multirc'):
    paragraphs: dict[int, dict[int, list]] = {}
    for ex, prediction in pairs:
      questions = paragraphs.setdefault(int(ex['idx/paragraph']), {})
      questions.setdefault(int(ex['idx/question']), []).append(
          {'idx': int(ex['idx/answer']), 'label': int(string_label_to_class_id(prediction) == 1)})
    return [{'idx': p, 'passage': {'questions': [{'idx': q, 'answers': answers}
                                                 for q, answers in questions.items()]}}
            for p, questions in paragraphs.items()]
  if base == task_name('record'):
    # The task repeats a query once per gold answer; the leaderboard wants each query once.
    by_query = {}
    for ex, prediction in pairs:
      by_query.setdefault(int(ex['idx/query']), prediction)
    return [{'idx': q, 'label': answer} for q, answer in by_query.items()]
  if base == WSC_EVAL:
    return [{'idx': int(ex['idx']), 'label': str(wsc_simple_postprocess(p, ex) == 1)} for ex, p in pairs]
  config = CONFIGS[base[len('super_glue_'):-len('_v102')]]
  records = []
  for ex, prediction in pairs:
    class_id = max(string_label_to_class_id(prediction, label_classes=config.labels), 0)
    if config.name == 'copa':
      label = class_id
    elif config.labels == BOOL_LABELS:
      label = config.labels[class_id].lower()
    else:
      label = config.labels[class_id]
    records.append({'idx': int(ex['idx']), 'label': label})
  return records


def submission_filename(task: str) -> str:
  return SUBMISSION_FILES[_base_task_name(task)]


def write_submission(output_dir: str, task: str, examples: Sequence[Mapping[str, Any]],
                     predictions: Sequence[str]) -> str:
  """Writes `<output_dir>/<BoolQ.jsonl ...>` for `task`; returns its path."""
  fileio.makedirs(output_dir)
  path = fileio.join(output_dir, submission_filename(task))
  with fileio.open(path, 'w', encoding='utf-8') as f:
    for record in submission_records(task, examples, predictions):
      f.write(json.dumps(record) + '\n')
  return path


register_superglue_tasks(common.default_vocabulary())
register_superglue_tasks(common.sentencepiece_vocabulary(), suffix=common.T5_VOCAB_SUFFIX)
