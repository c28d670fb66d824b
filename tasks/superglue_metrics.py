"""The official SuperGLUE metrics as seqio metric functions, values 0-100, with t5's key names.

Every function takes postprocessed `targets` and `predictions` lists (seqio's signature). Class ids come
from the label postprocessors: -1 means the model produced no valid label and always counts as wrong.
Grouped metrics take dicts {'value': ..., 'group': ...} (group on the targets only).
"""

import collections
import re
import string
from typing import Callable, Hashable, Sequence

import numpy as np


def accuracy(targets: Sequence, predictions: Sequence) -> dict:
  """{'accuracy'}: percentage of exact matches."""
  if not targets:
    return {'accuracy': 0.0}
  return {'accuracy': 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def _f1(true_positive: int, false_positive: int, false_negative: int) -> float:
  """F1 = 2TP / (2TP + FP + FN); 0 when the class never occurs and is never predicted (as sklearn)."""
  denominator = 2 * true_positive + false_positive + false_negative
  return 2.0 * true_positive / denominator if denominator else 0.0


def mean_multiclass_f1(num_classes: int) -> Callable:
  """Macro F1 over classes 0..num_classes-1 ({'mean_{n}class_f1'}: CB uses 3).

  An invalid prediction (-1) is a false negative for its true class and a false positive for none.
  """

  def metric(targets, predictions):
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    scores = []
    for c in range(num_classes):
      tp = int(np.sum((predictions == c) & (targets == c)))
      fp = int(np.sum((predictions == c) & (targets != c)))
      fn = int(np.sum((predictions != c) & (targets == c)))
      scores.append(_f1(tp, fp, fn))
    return {f'mean_{num_classes}class_f1': 100.0 * float(np.mean(scores))}

  metric.__name__ = f'mean_{num_classes}class_f1'
  return metric


mean_3class_f1 = mean_multiclass_f1(3)


def binary_f1(targets: Sequence[int], predictions: Sequence[int]) -> float:
  """F1 (0-100) of the positive class 1. Predictions other than 0/1 count as wrong."""
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  # Invalid predictions become the opposite of the target, so they are errors of the right kind.
  valid = (predictions == 0) | (predictions == 1)
  predictions = np.where(valid, predictions, 1 - targets)
  tp = int(np.sum((predictions == 1) & (targets == 1)))
  fp = int(np.sum((predictions == 1) & (targets == 0)))
  fn = int(np.sum((predictions == 0) & (targets == 1)))
  return 100.0 * _f1(tp, fp, fn)


def multirc_f1_over_all_answers(targets: Sequence[dict], predictions: Sequence[dict]) -> dict:
  """MultiRC F1a: binary F1 over every answer option ({'f1'})."""
  return {'f1': binary_f1([t['value'] for t in targets], [p['value'] for p in predictions])}


def multirc_exact_match(targets: Sequence[dict], predictions: Sequence[dict]) -> dict:
  """MultiRC EM ({'exact_match'}): percentage of questions whose answer options are all right.

  Questions are the target groups, (paragraph idx, question idx): question indices restart in every
  paragraph of the official data, so grouping by question alone would merge unrelated questions.
  """
  all_right = collections.defaultdict(lambda: True)
  for target, prediction in zip(targets, predictions):
    all_right[target['group']] &= target['value'] == prediction['value']
  if not all_right:
    return {'exact_match': 0.0}
  return {'exact_match': 100.0 * float(np.mean(list(all_right.values())))}


def normalize_squad(text: str) -> str:
  """SQuAD answer normalisation: lower case, drop punctuation and the articles a/an/the, squash spaces."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def squad_exact_match(prediction: str, answer: str) -> float:
  return float(normalize_squad(prediction) == normalize_squad(answer))


def squad_f1(prediction: str, answer: str) -> float:
  """Token-overlap F1 (0-1) between normalised prediction and answer."""
  predicted, gold = normalize_squad(prediction).split(), normalize_squad(answer).split()
  common = collections.Counter(predicted) & collections.Counter(gold)
  overlap = sum(common.values())
  if overlap == 0:
    return 0.0
  precision, recall = overlap / len(predicted), overlap / len(gold)
  return 2 * precision * recall / (precision + recall)


def record_em_f1(targets: Sequence[dict], predictions: Sequence[dict]) -> dict:
  """ReCoRD ({'em', 'f1'}): max over a query's gold answers of SQuAD EM / token F1, averaged over queries.

  Targets are {'value': [answers], 'group': (passage idx, query idx)}; the task repeats a query once per
  gold answer, so only one copy of each group counts.
  """
  by_group: dict[Hashable, tuple] = {}
  for target, prediction in zip(targets, predictions):
    by_group[target['group']] = (target['value'], prediction['value'])
  em, f1 = [], []
  for answers, predicted in by_group.values():
    # A query without gold answers (unlabelled data) scores 0 rather than failing the whole metric.
    em.append(max((squad_exact_match(predicted, a) for a in answers), default=0.0))
    f1.append(max((squad_f1(predicted, a) for a in answers), default=0.0))
  if not by_group:
    return {'em': 0.0, 'f1': 0.0}
  return {'em': 100.0 * float(np.mean(em)), 'f1': 100.0 * float(np.mean(f1))}


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> dict:
  """Matthews correlation ({'matthews_corrcoef'}, -100..100) for AX-b.

  The multiclass form (Gorodkin's R_K) from the confusion matrix, so an invalid prediction (-1) is its
  own class, as sklearn treats it; 0 when either side has a single class.
  """
  labels = sorted(set(targets) | set(predictions))
  index = {label: i for i, label in enumerate(labels)}
  confusion = np.zeros((len(labels), len(labels)), np.float64)
  for t, p in zip(targets, predictions):
    confusion[index[t], index[p]] += 1
  true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
  n, correct = confusion.sum(), np.trace(confusion)
  covariance = correct * n - true_counts @ predicted_counts
  scale = np.sqrt((n * n - predicted_counts @ predicted_counts) * (n * n - true_counts @ true_counts))
  return {'matthews_corrcoef': 100.0 * float(covariance / scale) if scale else 0.0}


# Words wsc_simple ignores when comparing a predicted referent with the true one.
WSC_DETERMINERS = frozenset((
    'a', 'an', 'each', 'every', 'few', 'her', 'his', 'many', 'much', 'my', 'our', 'some', 'that', 'the',
    'their', 'these', 'this', 'those', 'which', 'whose', 'your'))


def wsc_referent_match(prediction: str, referent: str) -> int:
  """1 if the predicted noun phrase names the referent, 0 if not, -1 for an empty prediction.

  Case and determiners are ignored, and either word set may contain the other ("fuzzy bunny" vs
  "bunny"); a possessive on one side only ("Bob" vs "Bob's hat") is a mismatch.
  """

  def words(text):
    return [w for w in text.strip().lower().split(' ') if w not in WSC_DETERMINERS]

  predicted, true = words(prediction), words(referent)
  if not ' '.join(predicted):
    return -1  # an empty prediction must not spuriously match a 0 label
  if ("'" in ' '.join(predicted)) != ("'" in ' '.join(true)):
    return 0
  predicted, true = set(predicted), set(true)
  return int(predicted <= true or true <= predicted)
