"""Pretraining tasks: the embedded stdlib corpus, text directories, span corruption, LM, C4 guard."""

import collections
import os
import pathlib
import re

import numpy as np
import pytest
import seqio
import tensorflow as tf

from tasks import common
from tasks import pretraining as pt

BYTES = seqio.ByteVocabulary()


@pytest.fixture(scope='module')
def small_stdlib():
  """The stdlib corpus capped at a few files per split: tests never pass over the whole corpus."""
  return pt.TextFilesSource(pt.stdlib_dir, patterns=('*.py',), exclude_dirs=pt.STDLIB_EXCLUDE_DIRS,
                            max_files=6)


def test_split_is_a_stable_hash_of_the_path():
  # Pinned: the split must not depend on the machine, the order of listing or the Python version.
  assert [pt.split_of(p) for p in ('asyncio/futures.py', 'collections/abc.py', 'crypt.py')] == [
      'validation'] * 3
  assert [pt.split_of(p) for p in ('os.py', 'json/__init__.py', 'difflib.py')] == ['train'] * 3
  fraction = np.mean([pt.split_of(f'dir{i}/file{i}.py') == 'validation' for i in range(4000)])
  assert 0.04 < fraction < 0.06
  assert pt.split_of('os.py', validation_fraction=1.0) == 'validation'


def test_stdlib_files_split_disjointly():
  source = pt.STDLIB_SOURCE
  train, validation = source.relative_files('train'), source.relative_files('validation')
  assert not set(train) & set(validation)
  assert len(validation) > 20 and len(train) > 10 * len(validation)
  assert 'os.py' in train and 'collections/abc.py' in validation
  assert not any('site-packages' in f or not f.endswith('.py') for f in train + validation)
  assert train == sorted(train)


def test_file_segments_are_line_aligned_and_bounded(tmp_path):
  lines = [f'line {i} ' + 'x' * (i % 17) for i in range(300)]
  path = tmp_path / 'a.txt'
  path.write_text('\n'.join(lines))
  segments = [s.decode() for s in pt.file_segments(tf.constant(str(path)), segment_chars=256).numpy()]
  assert len(segments) > 5
  assert '\n'.join(segments) == path.read_text()  # nothing lost, cuts only at line ends
  assert max(len(s) for s in segments) <= 256 + 40
  # A huge line is capped; invalid UTF-8 is replaced, not fatal.
  path.write_bytes(b'short\n' + b'y' * 5000 + b'\nbad \xff\xfe byte\n')
  segments = [s.decode() for s in pt.file_segments(tf.constant(str(path)), segment_chars=256).numpy()]
  assert segments == [('short\n' + 'y' * 5000)[:512], 'bad \ufffd\ufffd byte\n']


def test_span_corruption_lengths_match_t5():
  assert pt.span_corruption_lengths(512) == (568, 114)
  assert pt.span_corruption_lengths(128)[0] > 128


def test_noise_mask_density_and_spans():
  for seed in range(5):
    mask = pt.random_spans_noise_mask(tf.constant(100), tf.constant([seed, 7])).numpy()
    assert mask.sum() == 15 and not mask[0]
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert starts.sum() == 5  # round(15 / 3) spans
  assert pt.random_spans_noise_mask(tf.constant(1), tf.constant([0, 0])).numpy().tolist() == [False]


def reconstruct(inputs, targets, vocab_size):
  """Undo span corruption: put each sentinel's target span back where the inputs hold the sentinel."""
  spans, current = {}, None
  for t in targets:
    if t >= vocab_size - 100 and t == vocab_size - 1 - len(spans):
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  out = []
  for t in inputs:
    out += spans[t] if t in spans else [t]
  return out


def sentinels_in(ids, vocab_size, expected_count):
  return [t for t in ids if t >= vocab_size - expected_count]


def test_span_corruption_structure_on_synthetic_tokens():
  vocab_size = 259
  tokens = np.arange(3, 3 + 200, dtype=np.int32) % 200 + 3  # stays clear of the sentinel range
  ds = tf.data.Dataset.from_tensors({'targets': tokens})
  features = common.output_features(BYTES)
  with seqio.utils.map_seed_manager(42):
    ex = next(pt.span_corruption(ds, {'inputs': 200, 'targets': 64}, features).as_numpy_iterator())
  inputs, targets = ex['inputs'].tolist(), ex['targets'].tolist()
  num_spans = len(sentinels_in(inputs, vocab_size, 50))
  assert sentinels_in(inputs, vocab_size, 50) == list(range(258, 258 - num_spans, -1))  # from the top
  assert sentinels_in(targets, vocab_size, 50) == list(range(258, 258 - num_spans, -1))
  assert targets[0] == 258  # targets start with the first sentinel
  assert reconstruct(inputs, targets, vocab_size) == tokens.tolist()
  assert len(targets) - num_spans == 30  # 15% of 200 tokens are noise


def test_stdlib_span_corruption_reconstructs_the_corpus(small_stdlib):
  names = pt.register_pretraining_tasks('test_small_stdlib', small_stdlib)
  task = seqio.get_mixture_or_task(names[0])
  lengths = {'inputs': 128, 'targets': 64}
  exs = list(task.get_dataset(lengths, split='validation', shuffle=False, seed=3).take(3)
             .as_numpy_iterator())
  tokens_length, _ = pt.span_corruption_lengths(128)
  texts = small_stdlib.get_dataset('validation', shuffle=False).take(64)
  stream = np.concatenate([BYTES.encode_tf(x['text']).numpy() for x in texts])
  for i, ex in enumerate(exs):
    assert len(ex['inputs']) == 128 and ex['inputs'][-1] == BYTES.eos_id == ex['targets'][-1]
    original = stream[i * tokens_length:(i + 1) * tokens_length].tolist()
    assert reconstruct(ex['inputs'][:-1].tolist(), ex['targets'][:-1].tolist(), 259) == original
  # The same seed gives the same corruption.
  again = next(task.get_dataset(lengths, split='validation', shuffle=False, seed=3).as_numpy_iterator())
  np.testing.assert_array_equal(again['inputs'], exs[0]['inputs'])


def test_stdlib_lm_packs_documents_with_eos(small_stdlib):
  names = pt.register_pretraining_tasks('test_small_stdlib', small_stdlib)
  task = seqio.get_mixture_or_task(names[1])
  assert set(task.output_features) == {'targets'}
  exs = list(task.get_dataset({'targets': 256}, split='train', shuffle=False).take(4).as_numpy_iterator())
  assert [len(ex['targets']) for ex in exs] == [256] * 4
  first_segment = next(small_stdlib.get_dataset('train', shuffle=False).as_numpy_iterator())['text']
  expected = BYTES.encode(first_segment.decode()) + [BYTES.eos_id]
  stream = np.concatenate([ex['targets'] for ex in exs]).tolist()
  assert stream[:len(expected)] == expected[:len(stream)]


def test_registered_default_tasks_use_bytes():
  for name in ('stdlib_span_corruption', 'stdlib_lm', 'c4_span_corruption', 'c4_lm',
               'text_dir_span_corruption', 'text_dir_lm'):
    task = seqio.get_mixture_or_task(name)
    assert isinstance(task.output_features['targets'].vocabulary, seqio.ByteVocabulary)
    assert seqio.get_mixture_or_task(name + common.T5_VOCAB_SUFFIX)
  assert set(seqio.get_mixture_or_task('stdlib_span_corruption').splits) == {'train', 'validation'}


def test_t5vocab_sentinels_are_extra_ids():
  if not os.path.exists(common.T5_SPM_PATH):
    pytest.skip(f'T5 vocabulary {common.T5_SPM_PATH} not found')
  vocab = common.sentencepiece_vocabulary()
  tokens = np.asarray(vocab.encode('def f(x):\n  return x + 1\n' * 30), np.int32)
  ds = tf.data.Dataset.from_tensors({'targets': tokens})
  with seqio.utils.map_seed_manager(0):
    ex = next(pt.span_corruption(ds, {'inputs': 512, 'targets': 114},
                                 common.output_features(vocab)).as_numpy_iterator())
  assert vocab.decode([int(ex['targets'][0])]).strip() == '<extra_id_0>'
  assert reconstruct(ex['inputs'].tolist(), ex['targets'].tolist(), vocab.vocab_size) == tokens.tolist()


def test_text_dir_tasks(tmp_path):
  for i in range(60):
    (tmp_path / f'doc{i}.txt').write_text(f'document {i}\n' + 'words and more words\n' * 5)
  (tmp_path / '.hidden.txt').write_text('never read')
  names = pt.register_text_dir_tasks('test_dir', str(tmp_path), patterns=('*.txt',))
  assert names == ['test_dir_span_corruption', 'test_dir_lm']
  source = seqio.get_mixture_or_task('test_dir_lm').source
  assert len(source.relative_files('train')) + len(source.relative_files('validation')) == 60
  for split in ('train', 'validation'):
    ex = next(seqio.get_mixture_or_task('test_dir_lm').get_dataset(
        {'targets': 32}, split=split, shuffle=False).as_numpy_iterator())
    assert len(ex['targets']) == 32
  text = b''.join(x['text'] for x in source.get_dataset('train', shuffle=False).as_numpy_iterator())
  assert b'never read' not in text


def test_text_dir_errors(tmp_path, monkeypatch):
  monkeypatch.delenv('ST_MOE_TEXT_DIR', raising=False)
  with pytest.raises(common.MissingDataError, match='text_dir.path'):
    seqio.get_mixture_or_task('text_dir_lm').get_dataset({'targets': 32}, split='train')
  monkeypatch.setenv('ST_MOE_TEXT_DIR', str(tmp_path / 'nope'))
  with pytest.raises(common.MissingDataError, match='does not exist'):
    seqio.get_mixture_or_task('text_dir_lm').get_dataset({'targets': 32}, split='train')
  (tmp_path / 'one.txt').write_text('only one file\n')
  monkeypatch.setenv('ST_MOE_TEXT_DIR', str(tmp_path))
  split = 'train' if pt.split_of('one.txt') == 'validation' else 'validation'
  with pytest.raises(common.MissingDataError, match=f'No {split} files'):
    seqio.get_mixture_or_task('text_dir_lm').get_dataset({'targets': 32}, split=split)


def test_c4_missing_says_how_to_get_it(tmp_path):
  seqio.set_tfds_data_dir_override(str(tmp_path))
  try:
    with pytest.raises(common.MissingDataError, match=r'c4/en:3.1.0.*tfds build c4/en:3.1.0'):
      seqio.get_mixture_or_task('c4_span_corruption').get_dataset({'inputs': 64, 'targets': 16})
  finally:
    seqio.set_tfds_data_dir_override(None)
  assert not list(pathlib.Path(tmp_path).glob('**/*.tfrecord*'))


def test_unigram_baseline_by_hand_and_on_the_corpus(small_stdlib):
  train = np.zeros(256, np.int64)
  train[ord('a')], train[ord('b')] = 3, 1
  held_out = np.zeros(256, np.int64)
  held_out[ord('a')], held_out[ord('c')] = 1, 1
  # Add-one smoothing over 256 bytes: p(a) = 4/260, p(c) = 1/260.
  expected = -(np.log2(4 / 260) + np.log2(1 / 260)) / 2
  assert pt.unigram_bits_per_byte(train, held_out) == pytest.approx(expected)
  bits = pt.unigram_byte_baseline(small_stdlib)
  assert 3.5 < bits < 6.0  # Python source: far below 8 bits, far above a real model



def test_training_batches_are_mixed_across_files(tmp_path):
  """Consecutive training batches must not be cut from the same few files. A corpus shaped like the
  stdlib (many files of 2-30 KB, a few of 300 KB), each line naming its file, goes through the real
  task; per batch we count each file's share of the lines. Files taken whole, one after another (the old
  pipeline), gave a largest share of 0.32 and 68% of the lines from files already in the previous batch;
  mixed segments give 0.08 and 25%, which is what keeps the batch loss on a par with held-out loss."""
  rng = np.random.default_rng(0)
  for i in range(400):
    kb = 300 if i % 50 == 0 else int(rng.integers(2, 30))
    line = f'file{i:04d} ' + 'x' * 50 + '\n'
    (tmp_path / f'm{i:04d}.txt').write_text(line * (kb * 1024 // len(line)))
  name = [n for n in pt.register_text_dir_tasks('mixing_probe', str(tmp_path)) if n.endswith('_lm')][0]
  ds = seqio.get_mixture_or_task(name).get_dataset({'targets': 512}, split='train', shuffle=True, seed=0)
  ds = ds.map(lambda x: {'targets': x['targets']}).padded_batch(32, padded_shapes={'targets': [512]})
  largest_share, carried, previous = [], [], set()
  for batch in ds.take(60).as_numpy_iterator():
    tokens = batch['targets'][batch['targets'] > 0]
    text = bytes((tokens - 3).clip(0, 255).astype(np.uint8)).decode('latin1')  # 3 special byte ids
    counts = collections.Counter(re.findall(r'file\d{4}', text))
    total = sum(counts.values())
    largest_share.append(max(counts.values()) / total)
    carried.append(sum(v for k, v in counts.items() if k in previous) / total)
    previous = set(counts)
  assert np.mean(largest_share) < 0.15, np.mean(largest_share)
  assert np.mean(carried) < 0.4, np.mean(carried)


def test_training_reads_a_uniform_sample_of_segments(tmp_path):
  """Training shuffles the whole list of segments: one epoch gives every segment exactly once (none lost,
  none twice), and its first tenth already touches most files, as a uniform sample does. Reading files
  64 at a time (the old pipeline) touched 139 of 372 files in the first tenth, this 228: a run shorter than an
  epoch saw one part of the corpus, a different part per seed."""
  for i in range(400):
    lines = ''.join(f'file{i:04d} line{j:03d} ' + 'x' * 40 + '\n' for j in range(40))  # ~2.5 KB: 9 segments
    (tmp_path / f's{i:04d}.txt').write_text(lines)
  source = pt.TextFilesSource(str(tmp_path), segment_chars=256)
  in_order = [x['text'] for x in source.get_dataset('train', shuffle=False).as_numpy_iterator()]
  epochs = {}
  for seed in (0, 1):
    epochs[seed] = [x['text'] for x in source.get_dataset('train', shuffle=True, seed=seed).as_numpy_iterator()]
    assert sorted(epochs[seed]) == sorted(in_order)
  assert epochs[0] != epochs[1]
  files = {re.match(rb'file\d{4}', s).group() for s in in_order}
  first_tenth = epochs[0][:len(in_order) // 10]
  touched = {re.match(rb'file\d{4}', s).group() for s in first_tenth}
  # A uniform draw of 10% of 9-segment files touches 1 - 0.9^9 = 61% of them.
  assert len(touched) > 0.5 * len(files), (len(touched), len(files))
