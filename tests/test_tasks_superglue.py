"""SuperGLUE seqio tasks over the hand-written official-schema fixtures in tests/data/superglue/."""

import functools
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from tasks import common
from tasks import superglue as sg

FIXTURES = pathlib.Path(__file__).parent / 'data' / 'superglue'


@pytest.fixture(autouse=True)
def superglue_dir(monkeypatch):
  monkeypatch.setenv('SUPERGLUE_DIR', str(FIXTURES))


@pytest.fixture
def empty_tfds_dir(tmp_path):
  """Points TFDS at an empty directory, so no real prepared data can leak into a test."""
  seqio.set_tfds_data_dir_override(str(tmp_path / 'tfds'))
  yield tmp_path / 'tfds'
  seqio.set_tfds_data_dir_override(None)


def examples(name, split):
  return _examples(name, split, os.environ.get('SUPERGLUE_DIR'))


@functools.lru_cache(maxsize=None)
def _examples(name, split, data_dir):
  del data_dir  # part of the cache key: tests that point SUPERGLUE_DIR elsewhere must not hit the cache
  task = seqio.get_mixture_or_task(name)
  return list(task.get_dataset(None, split=split, shuffle=False).as_numpy_iterator())


def texts(name, split):
  return [(ex['inputs_pretokenized'].decode(), ex['targets_pretokenized'].decode())
          for ex in examples(name, split)]


def test_every_t5_name_is_registered_with_its_splits():
  expected = {
      'super_glue_boolq_v102': ('train', 'validation', 'test'),
      'super_glue_cb_v102': ('train', 'validation', 'test'),
      'super_glue_copa_v102': ('train', 'validation', 'test'),
      'super_glue_multirc_v102': ('train', 'validation', 'test'),
      'super_glue_record_v102': ('train', 'validation', 'test'),
      'super_glue_rte_v102': ('train', 'validation', 'test'),
      'super_glue_wic_v102': ('train', 'validation', 'test'),
      'super_glue_wsc_v102_simple_train': ('train',),
      'super_glue_wsc_v102_simple_eval': ('validation', 'test'),
      'super_glue_axb_v102': ('test',),
      'super_glue_axg_v102': ('test',),
  }
  for name, splits in expected.items():
    for variant in (name, name + common.T5_VOCAB_SUFFIX):
      assert tuple(seqio.get_mixture_or_task(variant).splits) == splits, variant


def test_boolq_cb_copa_rte_wic_formats():
  assert texts('super_glue_boolq_v102', 'validation')[0] == (
      'boolq passage: Water is a liquid at room temperature. question: is water wet', 'True')
  assert texts('super_glue_cb_v102', 'validation')[1] == (
      'cb hypothesis: the bridge had fallen premise: Nobody believed the bridge had fallen.', 'neutral')
  assert texts('super_glue_copa_v102', 'validation') == [
      ('copa choice1: She played checkers. choice2: She jumped rope. premise: The girl ran out of energy. '
       'question: cause', 'choice2'),
      ('copa choice1: My friend awoke. choice2: My friend snored. premise: I poured water on my sleeping '
       'friend. question: effect', 'choice1')]
  assert texts('super_glue_rte_v102', 'validation')[1] == (
      'rte hypothesis: The train left in the evening. premise: The train left at noon.', 'not_entailment')
  # Start/end offsets are not part of the text.
  assert texts('super_glue_wic_v102', 'validation')[0] == (
      'wic sentence1: Room and board. sentence2: He nailed boards across the windows. word: board', 'False')


def test_test_splits_have_unk_targets():
  for name in ('super_glue_boolq_v102', 'super_glue_cb_v102', 'super_glue_copa_v102',
               'super_glue_multirc_v102', 'super_glue_record_v102', 'super_glue_rte_v102',
               'super_glue_wic_v102'):
    assert {t for _, t in texts(name, 'test')} == {'<unk>'}, name


def test_multirc_strips_markup_and_keeps_indices():
  exs = examples('super_glue_multirc_v102', 'validation')
  assert len(exs) == 6  # one per answer option
  assert exs[2]['inputs_pretokenized'].decode() == (
      'multirc question: What does Anna bake? answer: Loaves of bread paragraph: Sent 1: Anna bakes '
      'bread. Sent 2: She sells it at the market on Sundays. ')
  assert exs[2]['targets_pretokenized'] == b'True'
  assert [(int(e['idx/paragraph']), int(e['idx/question']), int(e['idx/answer'])) for e in exs] == [
      (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 3), (0, 1, 4), (1, 0, 0)]


def test_record_one_example_per_answer():
  exs = examples('super_glue_record_v102', 'validation')
  assert [e['targets_pretokenized'].decode() for e in exs] == ['France', 'Paris', 'Paris (CNN)', 'Thames']
  assert exs[0]['inputs_pretokenized'].decode() == (
      'record query: @placeholder announced the reopening. entities: CNN, France, Louvre, Paris passage: '
      'Paris (CNN) -- The Louvre in Paris reopened on Monday, France said. The Louvre reopened. Visitors '
      'returned to Paris')
  # "said!\n@highlight\n" keeps its own punctuation.
  assert exs[3]['inputs_pretokenized'].decode().endswith('officials said! Thames floods London')
  assert [list(e['answers']) for e in exs[1:3]] == [[b'Paris', b'Paris (CNN)']] * 2
  assert [(int(e['idx/passage']), int(e['idx/query'])) for e in exs] == [(0, 0), (0, 1), (0, 1), (1, 2)]


def test_wsc_simple_train_and_eval():
  # Train keeps only right referents; "the trophy" is repaired to the text's "The trophy" (wsc.fixed).
  assert texts('super_glue_wsc_v102_simple_train', 'train') == [
      ("wsc: The trophy doesn't fit into the brown suitcase because *it* is too large.", 'The trophy'),
      ('wsc: The city councilmen refused the demonstrators a permit because *they* feared violence.',
       'The city councilmen')]
  evals = examples('super_glue_wsc_v102_simple_eval', 'validation')
  assert [(e['targets_pretokenized'].decode(), int(e['label'])) for e in evals] == [
      ('The man', 1), ('Susan', 1), ('Joan', 0)]
  assert evals[1]['inputs_pretokenized'].decode() == (
      'wsc: Joan made sure to thank Susan for all the help *she* had given.')


def test_wsc_marks_pronoun_with_punctuation_and_off_index():
  text = 'He said "Good for him," and left.'
  marked = sg.wsc_marked_text(text, 3, 'him').numpy().decode()
  assert marked == 'He said "Good for *him* ," and left.'
  # Index pointing at the word before the pronoun: the nearest matching word is marked.
  marked = sg.wsc_marked_text('they might want to use it , but', 4, 'it').numpy().decode()
  assert marked == 'they might want to use *it* , but'


def test_axb_and_axg_cast_as_rte():
  assert texts('super_glue_axb_v102', 'test')[0] == (
      'rte hypothesis: The cat did not sit on the mat. premise: The cat sat on the mat.', 'not_entailment')
  assert texts('super_glue_axg_v102', 'test')[1][1] == 'entailment'


def test_tokens_are_the_text_plus_eos():
  ex = examples('super_glue_boolq_v102', 'train')[0]
  vocab = seqio.ByteVocabulary()
  assert ex['inputs'][-1] == vocab.eos_id and ex['targets'][-1] == vocab.eos_id
  assert vocab.decode(ex['inputs'][:-1].tolist()) == ex['inputs_pretokenized'].decode()


def test_t5vocab_twin_tokenizes_with_sentencepiece():
  if not os.path.exists(common.T5_SPM_PATH):
    pytest.skip(f'T5 vocabulary {common.T5_SPM_PATH} not found')
  ex = examples('super_glue_rte_v102' + common.T5_VOCAB_SUFFIX, 'validation')[0]
  vocab = common.sentencepiece_vocabulary()
  assert ex['inputs'][-1] == vocab.eos_id == 1
  assert vocab.decode(ex['inputs'].tolist()) == ex['inputs_pretokenized'].decode()
  assert vocab.decode(ex['targets'].tolist()) == 'entailment'


@pytest.mark.parametrize('config_name', sorted(sg.CONFIGS))
def test_jsonl_reader_matches_tfds_builder(config_name):
  """Same features, dtypes and values as TFDS's own super_glue builder on the same official files."""
  config = sg.CONFIGS[config_name]
  builder = tfds.builder(f'super_glue/{config_name}:1.0.2')
  features = builder.info.features
  assert features.get_tensor_spec() == sg.feature_spec(config)
  for split in sg.config_splits(config):
    path = sg.jsonl_path(str(FIXTURES), config, split)
    expected = [features.encode_example(ex) for _, ex in builder._generate_examples(path, split)]
    ds = sg.examples_to_dataset(sg.read_examples(str(FIXTURES), config_name, split), config)
    assert ds.element_spec == features.get_tensor_spec()
    got = list(ds.as_numpy_iterator())
    assert len(got) == len(expected) > 0
    for ours, theirs in zip(got, expected):
      assert _plain(ours) == _plain(theirs), (split, ours, theirs)


def _plain(value):
  """Nested numpy/bytes → plain python (str, int, list) for comparison."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim):
    return [_plain(v) for v in value]
  return common.text_of(value) if isinstance(value, (bytes, str, np.ndarray)) and (
      np.asarray(value).dtype.kind in 'OSU') else int(value)


def _perfect(name, split):
  task = seqio.get_mixture_or_task(name)
  exs = examples(name, split)
  targets = [task.postprocess_fn(ex['targets_pretokenized'].decode(), example=ex, is_target=True)
             for ex in exs]
  predictions = [task.postprocess_fn(ex['targets_pretokenized'].decode(), example=ex) for ex in exs]
  scores = {}
  for fn in task.metric_fns:
    scores.update(fn(targets, predictions))
  return scores


def test_metrics_wired_to_postprocessors():
  assert _perfect('super_glue_boolq_v102', 'validation') == {'accuracy': 100.0}
  assert _perfect('super_glue_copa_v102', 'validation') == {'accuracy': 100.0}
  assert _perfect('super_glue_wic_v102', 'validation') == {'accuracy': 100.0}
  # CB validation has no contradiction example, so a perfect macro-F1 is 2/3 (as sklearn).
  assert _perfect('super_glue_cb_v102', 'validation') == {
      'mean_3class_f1': pytest.approx(200 / 3), 'accuracy': 100.0}
  assert _perfect('super_glue_multirc_v102', 'validation') == {'f1': 100.0, 'exact_match': 100.0}
  assert _perfect('super_glue_record_v102', 'validation') == {'em': 100.0, 'f1': 100.0}
  assert _perfect('super_glue_axb_v102', 'test') == {'matthews_corrcoef': 100.0}


def test_wsc_eval_postprocess_compares_with_referent():
  task = seqio.get_mixture_or_task('super_glue_wsc_v102_simple_eval')
  exs = examples('super_glue_wsc_v102_simple_eval', 'validation')
  # The model names "the man", "Susan", "Susan": right, right, and (candidate Joan is wrong) right.
  predictions = [task.postprocess_fn(p, example=ex) for p, ex in zip(['the man', 'Susan', 'Susan'], exs)]
  targets = [task.postprocess_fn(b'', example=ex, is_target=True) for ex in exs]
  assert predictions == [1, 1, 0] and targets == [1, 1, 0]
  assert task.metric_fns[0](targets, predictions) == {'accuracy': 100.0}


def test_mixture_has_t5_rates():
  mixture = seqio.get_mixture_or_task(sg.MIXTURE)
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates == {
      'super_glue_boolq_v102': 9427, 'super_glue_cb_v102': 250, 'super_glue_copa_v102': 400,
      'super_glue_multirc_v102': 27243, 'super_glue_record_v102': 138854, 'super_glue_rte_v102': 2490,
      'super_glue_wic_v102': 5428, 'super_glue_wsc_v102_simple_train': 259,
      'super_glue_wsc_v102_simple_eval': 0, 'super_glue_axb_v102': 0, 'super_glue_axg_v102': 0}
  batch = next(mixture.get_dataset({'inputs': 64, 'targets': 8}, split='train', seed=0).as_numpy_iterator())
  assert set(batch) == {'inputs', 'targets'}


def test_submission_records_formats():
  exs = examples('super_glue_boolq_v102', 'test')
  assert sg.submission_records('super_glue_boolq_v102', exs, ['True', 'garbage']) == [
      {'idx': 0, 'label': 'true'}, {'idx': 1, 'label': 'false'}]
  exs = examples('super_glue_copa_v102', 'test')
  assert sg.submission_records('super_glue_copa_v102', exs, ['choice2']) == [{'idx': 500, 'label': 1}]
  exs = examples('super_glue_cb_v102', 'test')
  assert sg.submission_records('super_glue_cb_v102', exs, [b'neutral']) == [{'idx': 0, 'label': 'neutral'}]
  exs = examples('super_glue_wic_v102', 'test')
  assert sg.submission_records('super_glue_wic_v102', exs, ['False']) == [{'idx': 0, 'label': 'false'}]
  exs = examples('super_glue_axb_v102', 'test')
  assert sg.submission_records('super_glue_axb_v102', exs, ['entailment'] * 3) == [
      {'idx': i, 'label': 'entailment'} for i in range(3)]
  exs = examples('super_glue_wsc_v102_simple_eval', 'test')
  assert sg.submission_records('super_glue_wsc_v102_simple_eval', exs, ['the dog']) == [
      {'idx': 0, 'label': 'True'}]
  exs = examples('super_glue_record_v102', 'test')
  assert sg.submission_records('super_glue_record_v102', exs, ['London']) == [{'idx': 0, 'label': 'London'}]


def test_submission_multirc_nested_and_record_deduplicated():
  exs = examples('super_glue_multirc_v102', 'validation')
  predictions = ['True', 'False', 'True', 'True', 'nonsense', 'False']
  assert sg.submission_records('super_glue_multirc_v102', exs, predictions) == [
      {'idx': 0, 'passage': {'questions': [
          {'idx': 0, 'answers': [{'idx': 0, 'label': 1}, {'idx': 1, 'label': 0}, {'idx': 2, 'label': 1}]},
          {'idx': 1, 'answers': [{'idx': 3, 'label': 1}, {'idx': 4, 'label': 0}]}]}},
      {'idx': 1, 'passage': {'questions': [{'idx': 0, 'answers': [{'idx': 0, 'label': 0}]}]}}]
  exs = examples('super_glue_record_v102', 'validation')
  assert sg.submission_records('super_glue_record_v102', exs, ['France', 'Paris', 'Paris', 'Thames']) == [
      {'idx': 0, 'label': 'France'}, {'idx': 1, 'label': 'Paris'}, {'idx': 2, 'label': 'Thames'}]


def test_write_submission_file_names(tmp_path):
  assert [sg.submission_filename(n) for n in sg.SUBMISSION_FILES] == [
      'BoolQ.jsonl', 'CB.jsonl', 'COPA.jsonl', 'MultiRC.jsonl', 'ReCoRD.jsonl', 'RTE.jsonl', 'WiC.jsonl',
      'WSC.jsonl', 'AX-b.jsonl', 'AX-g.jsonl']
  assert sg.submission_filename('super_glue_rte_v102_t5vocab') == 'RTE.jsonl'
  exs = examples('super_glue_axg_v102', 'test')
  path = sg.write_submission(str(tmp_path), 'super_glue_axg_v102', exs, ['entailment', 'not_entailment'])
  assert os.path.basename(path) == 'AX-g.jsonl'
  lines = pathlib.Path(path).read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {'idx': 0, 'label': 'entailment'}, {'idx': 1, 'label': 'not_entailment'}]
  with pytest.raises(ValueError, match='no SuperGLUE submission file'):
    sg.submission_filename('super_glue_wsc_v102_simple_train')


def test_missing_jsonl_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setenv('SUPERGLUE_DIR', str(tmp_path))
  with pytest.raises(common.MissingDataError) as error:
    examples('super_glue_boolq_v102', 'validation')
  message = str(error.value)
  assert 'BoolQ/val.jsonl' in message and 'SUPERGLUE_DIR' in message
  assert "tfds.builder('super_glue/boolq:1.0.2').download_and_prepare()" in message


def test_missing_tfds_data_says_how_to_get_it(monkeypatch, empty_tfds_dir):
  monkeypatch.delenv('SUPERGLUE_DIR')
  with pytest.raises(common.MissingDataError) as error:
    examples('super_glue_cb_v102', 'train')
  message = str(error.value)
  assert 'super_glue/cb:1.0.2' in message and 'SUPERGLUE_DIR' in message
  assert not any(empty_tfds_dir.glob('**/*.tfrecord*'))  # nothing was downloaded


def test_malformed_jsonl_names_file_and_line(tmp_path, monkeypatch):
  shutil.copytree(FIXTURES / 'RTE', tmp_path / 'RTE')
  path = tmp_path / 'RTE' / 'val.jsonl'
  path.write_text(path.read_text() + '{"premise": "cut off\n')
  monkeypatch.setenv('SUPERGLUE_DIR', str(tmp_path))
  with pytest.raises(common.MalformedDataError, match=f'{path}:3: not valid JSON'):
    examples('super_glue_rte_v102', 'validation')
  # A row lacking a field, and a train row lacking its label.
  path.write_text('{"premise": "p", "idx": 0, "label": "entailment"}\n')
  with pytest.raises(common.MalformedDataError, match=f'{path}:1: .*hypothesis'):
    examples('super_glue_rte_v102', 'validation')
  path.write_text('{"premise": "p", "hypothesis": "h", "idx": 0, "label": "maybe"}\n')
  with pytest.raises(common.MalformedDataError, match=f'{path}:1: label .maybe.'):
    examples('super_glue_rte_v102', 'validation')
  (tmp_path / 'RTE' / 'train.jsonl').write_text('{"premise": "p", "hypothesis": "h", "idx": 0}\n')
  with pytest.raises(common.MalformedDataError, match=r'train.jsonl:1: no .label. in a train example'):
    examples('super_glue_rte_v102', 'train')


def test_unknown_task_lists_close_names():
  with pytest.raises(common.UnknownTaskError) as error:
    common.get_task_or_mixture('super_glue_boolq_v12')
  assert 'super_glue_boolq_v102' in str(error.value)
  with pytest.raises(common.UnknownTaskError, match='super_glue_v102_proportional'):
    common.get_task_or_mixture('superglue_v102_proportional')
  with pytest.raises(common.UnknownTaskError, match='No registered name is close'):
    common.get_task_or_mixture('zzzz_qqqq_xxxx')
  assert common.get_task_or_mixture('super_glue_rte_v102').name == 'super_glue_rte_v102'


def test_invalid_predictions_are_listed_and_reported(tmp_path, capsys):
  """A prediction that is no label is written as the first label (the leaderboard needs one per example),
  and never silently: it is listed, and infer prints how many."""
  assert sg.invalid_predictions('super_glue_boolq_v102', ['True', 'garbage', b'False']) == ['garbage']
  assert sg.invalid_predictions('super_glue_cb_v102', ['neutral', 'maybe']) == ['maybe']
  assert sg.invalid_predictions('super_glue_multirc_v102', ['True', 'yes']) == ['yes']
  assert sg.invalid_predictions('super_glue_record_v102', ['anything']) == []
  from st_moe_jax import infer
  exs = [{'idx': 0}, {'idx': 1}, {'idx': 2}]
  infer._write_submission(str(tmp_path), 'super_glue_boolq_v102', exs, ['True', 'garbage', 'nonsense'], 'test')
  out = capsys.readouterr().out
  assert "WARNING: 2 of 3 super_glue_boolq_v102 predictions are not a label (e.g. ['garbage', 'nonsense'])" in out
  records = [json.loads(line) for line in (tmp_path / 'BoolQ.jsonl').read_text().splitlines()]
  assert [r['label'] for r in records] == ['true', 'false', 'false']
