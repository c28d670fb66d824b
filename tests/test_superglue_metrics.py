"""The official SuperGLUE metrics on hand-computed cases (tasks/superglue_metrics.py)."""

import math

import pytest

from tasks import superglue_metrics as m


def test_accuracy_counts_invalid_as_wrong():
  assert m.accuracy([0, 1, 1, 0], [0, 1, 0, -1]) == {'accuracy': 50.0}
  assert m.accuracy([], []) == {'accuracy': 0.0}


def test_cb_macro_f1_by_hand():
  # class 0: TP 1, FN 1 → 2/3; class 1: TP 1, FP 1 → 2/3; class 2: FN 1 (the -1) → 0.
  scores = m.mean_3class_f1([0, 0, 1, 2], [0, 1, 1, -1])
  assert scores.keys() == {'mean_3class_f1'}
  assert scores['mean_3class_f1'] == pytest.approx(100 * 4 / 9)


def test_cb_macro_f1_counts_absent_classes_as_zero():
  # As sklearn with labels=range(3): a class never seen nor predicted scores 0, so perfect ≠ 100 here.
  assert m.mean_3class_f1([0, 0], [0, 0])['mean_3class_f1'] == pytest.approx(100 / 3)
  assert m.mean_3class_f1([0, 1, 2], [0, 1, 2])['mean_3class_f1'] == pytest.approx(100.0)


def test_multirc_f1a_invalid_predictions_are_errors():
  targets = [{'value': v} for v in (1, 0, 1, 1)]
  predictions = [{'value': v} for v in (1, 1, -1, 1)]
  # -1 becomes 0 against target 1: TP 2, FP 1, FN 1 → F1 = 4/6.
  assert m.multirc_f1_over_all_answers(targets, predictions)['f1'] == pytest.approx(100 * 4 / 6)
  assert m.binary_f1([0, 0], [0, 0]) == 0.0  # no positives anywhere


def test_multirc_exact_match_groups_by_paragraph_and_question():
  # Question idx 0 occurs in paragraphs 0 and 1; they are separate questions.
  groups = [(0, 0), (0, 0), (0, 1), (1, 0), (1, 0)]
  truth = [1, 0, 1, 1, 1]
  predicted = [1, 0, 1, 1, 0]  # (1, 0) has one wrong answer
  targets = [{'value': v, 'group': g} for v, g in zip(truth, groups)]
  predictions = [{'value': v} for v in predicted]
  assert m.multirc_exact_match(targets, predictions) == {'exact_match': pytest.approx(100 * 2 / 3)}
  # Grouping by question alone would merge (0, 0) and (1, 0) and give 50.
  by_question = [{'value': v, 'group': g[1]} for v, g in zip(truth, groups)]
  assert m.multirc_exact_match(by_question, predictions)['exact_match'] == pytest.approx(50.0)


@pytest.mark.parametrize('text, normalized', [
    ('The  Louvre!', 'louvre'),
    ('an Apple a day', 'apple day'),
    ('Paris (CNN)', 'paris cnn'),
    ("Tom's bike", 'toms bike'),
    ('theatre', 'theatre'),  # "the" only as a word
])
def test_squad_normalisation(text, normalized):
  assert m.normalize_squad(text) == normalized


def test_squad_f1_by_hand():
  assert m.squad_f1('the city of Paris', 'Paris') == pytest.approx(0.5)  # P 1/3, R 1
  assert m.squad_f1('Louvre museum', 'The Louvre') == pytest.approx(2 / 3)  # P 1/2, R 1
  assert m.squad_f1('London', 'Paris') == 0.0
  assert m.squad_exact_match('the Louvre.', 'Louvre') == 1.0


def test_record_max_over_answers_and_deduplicated():
  # The task repeats query (0, 1) once per gold answer; it must count once.
  targets = [{'value': ['Paris', 'Paris (CNN)'], 'group': (0, 1)},
             {'value': ['Paris', 'Paris (CNN)'], 'group': (0, 1)},
             {'value': ['France'], 'group': (0, 0)},
             {'value': ['Thames'], 'group': (1, 2)}]
  predictions = [{'value': 'paris'}, {'value': 'paris'}, {'value': 'Germany'},
                 {'value': 'the river Thames'}]
  scores = m.record_em_f1(targets, predictions)
  assert scores['em'] == pytest.approx(100 / 3)
  # F1: 1, 0, and "river thames" vs "thames" = 2/3.
  assert scores['f1'] == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)


def test_matthews_by_hand():
  # TP 1, FN 1, TN 2, FP 0: (1·2 − 0·1) / sqrt(1·2·2·3).
  score = m.matthews_corrcoef([1, 1, 0, 0], [1, 0, 0, 0])['matthews_corrcoef']
  assert score == pytest.approx(100 * 2 / math.sqrt(12))
  assert m.matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1])['matthews_corrcoef'] == pytest.approx(100)
  assert m.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0])['matthews_corrcoef'] == pytest.approx(-100)
  assert m.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1])['matthews_corrcoef'] == 0.0


@pytest.mark.parametrize('prediction, referent, expected', [
    ('the trophy', 'The trophy', 1),
    ('trophy', 'The brown trophy', 1),       # one word set inside the other
    ('The city councilmen', 'councilmen', 1),
    ('suitcase', 'The trophy', 0),
    ('Bob', "Bob's hat", 0),                  # possessive on one side only
    ('', 'Mark', -1),
    ('the', 'Mark', -1),                      # only a determiner is empty too
])
def test_wsc_referent_match(prediction, referent, expected):
  assert m.wsc_referent_match(prediction, referent) == expected
