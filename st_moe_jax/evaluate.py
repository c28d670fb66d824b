r"""Evaluation entry point (t5x's eval.py): restores CHECKPOINT_PATH and evaluates on a split.

  python -m st_moe_jax.evaluate --gin_file=gin/runs/eval.gin --gin_file=gin/models/st_moe_tiny.gin \
      --gin.CHECKPOINT_PATH="'runs/demo'" --gin.EVAL_OUTPUT_DIR="'runs/demo/eval'" \
      --gin.MIXTURE_OR_TASK_NAME="'stdlib_span_corruption'" \
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 256, 'targets': 64}"

Reports teacher-forced loss, accuracy, bits per token and, for a byte vocabulary, bits per byte, plus each
MoE layer's expert usage and fraction of tokens dropped. Results go to the console, to
EVAL_OUTPUT_DIR/<task>-metrics.jsonl (one line per evaluation) and to TensorBoard under
EVAL_OUTPUT_DIR/eval/<task>.

Inference eval (t5x's seqio.Evaluator): an encoder-decoder decodes (greedy) every task that has metric
functions (SuperGLUE: accuracy, mean_3class_f1, ...); predictions and targets go through the task's
postprocessor and its metric functions. A mixture is evaluated task by task (tasks without the split are
skipped). t5x's layout:
  EVAL_OUTPUT_DIR/inference_eval/<task>-metrics.jsonl   {"step": ..., "<metric>": ...} per evaluation
  EVAL_OUTPUT_DIR/inference_eval/<task>-<step:06>.jsonl one line per example: inputs, targets, prediction
  EVAL_OUTPUT_DIR/inference_eval/<task>/                TensorBoard scalars eval/<metric>
"""

import st_moe_jax  # pylint: disable=g-bad-import-order  (first: TensorFlow's start-up lines are dropped)
if __name__ == '__main__':  # a line within the first second: the imports below take several
  print('st_moe_jax.evaluate: loading JAX and TensorFlow...', flush=True)
st_moe_jax.import_tensorflow_quietly()

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
from typing import Any, Mapping, Optional, Sequence

import gin
import jax
import numpy as np

from st_moe_jax import checkpoint_manager as ckpt_lib
from st_moe_jax import cli
from st_moe_jax import data as data_lib
from st_moe_jax import decoding
from st_moe_jax import fileio
from st_moe_jax import summaries
from st_moe_jax import trainer as trainer_lib


def restore_evaluator(model: Any, checkpoint_path: str, dataset_cfg: data_lib.DatasetConfig,
                      num_expert_partitions: int, num_model_partitions: int,
                      output_dir: Optional[tuple[str, str]] = None):
  """(evaluator, params, step, batches) for evaluating `model` from a checkpoint on dataset_cfg (no
  optimizer: only the parameters are restored). output_dir: (macro, path) of the folder the results go to,
  checked for writing after the configuration checks and before any data or checkpoint is read."""
  mesh = cli.create_mesh(num_expert_partitions, num_model_partitions, model)
  model = cli.with_expert_replicas(model, mesh)
  cli.check_batch(dataset_cfg.batch_size, mesh)
  kind = cli.model_kind(model)
  cli.check_task_fits_model(dataset_cfg, kind)
  if output_dir is not None:
    cli.check_writable(output_dir[1], output_dir[0])
  ds = data_lib.get_dataset(dataset_cfg, kind, num_processes=jax.process_count(),
                            shard=data_lib.shard_info())
  first = next(data_lib.DataIterator(ds))
  evaluator = trainer_lib.Evaluator(model, mesh, model_kind=kind)
  evaluator.prepare(data_lib.pad_batch(first, dataset_cfg.batch_size // jax.process_count()))
  params, _ = ckpt_lib.restore_params(checkpoint_path, evaluator.abstract_params)
  step = ckpt_lib.checkpoint_step(ckpt_lib.resolve_checkpoint_dir(checkpoint_path))
  return evaluator, params, step, ds


def evaluate(*, model: Any = gin.REQUIRED, checkpoint_path: Optional[str] = gin.REQUIRED,
             eval_output_dir: Optional[str] = gin.REQUIRED,
             dataset_cfg: data_lib.DatasetConfig = gin.REQUIRED, eval_steps: Optional[int] = None,
             num_expert_partitions: int = 1, num_model_partitions: int = 1,
             inference_eval: bool = True, print_fn=print) -> dict[str, dict[str, float]]:
  """Evaluates the checkpoint on dataset_cfg's split (all of it unless eval_steps), task by task.

  Returns {task: teacher-forced metrics, plus 'inference/<metric>' from the inference eval}.
  """
  checkpoint_path = cli.required(checkpoint_path, 'CHECKPOINT_PATH', '"\'runs/my_run\'"')
  eval_output_dir = cli.required(eval_output_dir, 'EVAL_OUTPUT_DIR', '"\'runs/my_run/eval\'"')
  cli.check_checkpoint_path(checkpoint_path)
  tasks = tasks_with_split(dataset_cfg.mixture_or_task_name, dataset_cfg.split)
  cfgs = {t.name: dataclasses.replace(dataset_cfg, mixture_or_task_name=t.name) for t in tasks}
  # A read-only EVAL_OUTPUT_DIR fails here, not after the whole evaluation has run.
  evaluator, params, step, _ = restore_evaluator(model, checkpoint_path, cfgs[tasks[0].name],
                                                 num_expert_partitions, num_model_partitions,
                                                 output_dir=('EVAL_OUTPUT_DIR', eval_output_dir))
  out = {}
  for task in tasks:
    results = teacher_forced(evaluator, params, cfgs[task.name], step, eval_output_dir, eval_steps, print_fn)
    if inference_eval and task.predict_metric_fns and evaluator.kind == data_lib.ENCODER_DECODER:
      scores = inference_eval_task(evaluator, params, task, cfgs[task.name], step, eval_output_dir,
                                   max_batches=eval_steps, print_fn=print_fn)
      results.update({f'inference/{k}': v for k, v in scores.items()})
    out[task.name] = results
  return out


def tasks_with_split(name: str, split: str) -> list:
  """The task called `name`, or a mixture's tasks that have `split`."""
  import seqio  # pylint: disable=g-import-not-at-top
  from tasks import common  # pylint: disable=g-import-not-at-top
  task_or_mixture = common.get_task_or_mixture(name)
  if isinstance(task_or_mixture, seqio.Task):
    return [task_or_mixture]
  tasks = [t for t in task_or_mixture.tasks if split in t.splits]
  if not tasks:
    raise cli.UserError(f'No task of the mixture {name!r} has a {split!r} split; its tasks: '
                        f'{[t.name for t in task_or_mixture.tasks]}.')
  return tasks


def teacher_forced(evaluator, params, cfg: data_lib.DatasetConfig, step: int, eval_output_dir: str,
                   eval_steps: Optional[int], print_fn=print) -> dict[str, float]:
  """Teacher-forced metrics of one task: EVAL_OUTPUT_DIR/<task>-metrics.jsonl and eval/<task>/ scalars."""
  ds = data_lib.get_dataset(cfg, evaluator.kind, num_processes=jax.process_count(),
                            shard=data_lib.shard_info())
  rows = cfg.batch_size // jax.process_count()
  batches = (data_lib.pad_batch(b, rows) for b in data_lib.DataIterator(ds))
  name = cfg.mixture_or_task_name
  progress = summaries.Progress(f'evaluating {name} ({cfg.split})', eval_steps, print_fn=print_fn)
  results = trainer_lib.evaluate(evaluator, params, batches, rows, eval_steps, progress)
  if jax.process_index() == 0:
    fileio.makedirs(eval_output_dir)
    with fileio.open(fileio.join(eval_output_dir, f'{name}-metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': step, 'split': cfg.split, **results}) + '\n')
    summaries.write_scalars(fileio.join(eval_output_dir, 'eval', name), step,
                            {k: v for k, v in results.items() if not k.startswith('layer/')})
  print_fn(format_results(name, cfg.split, step, results))
  return results


# ---------------------------------------------------------------------------------------------------------
# Decoding a task (inference eval here, leaderboard files in infer.py).

def task_examples(task, cfg: data_lib.DatasetConfig, max_batches: Optional[int] = None) -> list[dict]:
  """The task's preprocessed examples of cfg.split in order (tokens trimmed to TASK_FEATURE_LENGTHS),
  with every other feature (*_pretokenized, idx, ...) kept for postprocessors and submission files."""
  lengths = data_lib._needed_lengths(task, cfg.task_feature_lengths)  # pylint: disable=protected-access
  ds = task.get_dataset(lengths, split=cfg.split, use_cached=cfg.use_cached, shuffle=False,
                        seed=cfg.seed, num_epochs=1, trim_output_features=True)
  if max_batches is not None:
    ds = ds.take(max_batches * cfg.batch_size)
  return list(ds.as_numpy_iterator())


def _padded(sequences: Sequence[np.ndarray], rows: int, length: int) -> np.ndarray:
  out = np.zeros((rows, length), np.int32)
  for i, seq in enumerate(sequences):
    out[i, :len(seq)] = seq[:length]
  return out


def decode_examples(evaluator, params, examples: Sequence[Mapping[str, Any]], batch_size: int,
                    input_length: int, target_length: int, method: str = 'greedy',
                    label: str = 'decoding') -> list[np.ndarray]:
  """Decoded target tokens [target_length] of each example (encoder-decoder; greedy by default)."""
  if evaluator.kind != data_lib.ENCODER_DECODER:
    raise cli.UserError('Decoding tasks with inputs needs an encoder-decoder model; decoder-only '
                        'models are evaluated teacher-forced only.')
  outputs = []
  progress = summaries.Progress(label, -(-len(examples) // batch_size))
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    inputs = _padded([ex['inputs'] for ex in chunk], batch_size, input_length)
    tokens, _ = decoding.generate(evaluator.model, params, max_decode_length=target_length, method=method,
                                  encoder_input_tokens=inputs)
    outputs.extend(np.asarray(jax.device_get(tokens))[:len(chunk)])
    progress.update()
  progress.done()
  return outputs


def decode_text(vocabulary, tokens: Sequence[int]) -> str:
  """Text of token ids (padding 0 dropped; the vocabulary stops at EOS)."""
  return vocabulary.decode([int(t) for t in tokens if t > 0])


def predict_task(evaluator, params, task, cfg: data_lib.DatasetConfig, max_batches: Optional[int] = None,
                 method: str = 'greedy') -> tuple[list[dict], list[str], list[np.ndarray]]:
  """(examples, decoded prediction texts, prediction tokens) of one task's split."""
  lengths = cfg.task_feature_lengths
  if 'inputs' not in lengths or 'targets' not in lengths:
    raise cli.UserError(f'TASK_FEATURE_LENGTHS={dict(lengths)} needs "inputs" and "targets" lengths '
                        'to decode an encoder-decoder.')
  examples = task_examples(task, cfg, max_batches)
  rows = cfg.batch_size // jax.process_count()
  tokens = decode_examples(evaluator, params, examples, rows, lengths['inputs'], lengths['targets'], method,
                           label=f'decoding {task.name} ({cfg.split})')
  vocabulary = task.output_features['targets'].vocabulary
  return examples, [decode_text(vocabulary, t) for t in tokens], tokens


def _text(example: Mapping[str, Any], key: str, vocabulary) -> str:
  """The *_pretokenized text of a feature, else its tokens decoded."""
  from tasks import common  # pylint: disable=g-import-not-at-top
  if f'{key}_pretokenized' in example:
    return common.text_of(example[f'{key}_pretokenized'])
  return decode_text(vocabulary, example.get(key, []))


def _jsonable(value: Any) -> Any:
  """Postprocessed values (numpy scalars, tuples, bytes) as plain JSON values."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in value]
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  if isinstance(value, np.generic):
    return value.item()
  return value


def prediction_records(task, examples, predictions: Sequence[str]) -> list[dict]:
  """One JSON record per example: inputs, targets, prediction (texts)."""
  vocabulary = task.output_features['targets'].vocabulary
  return [{'inputs': _text(ex, 'inputs', vocabulary), 'targets': _text(ex, 'targets', vocabulary),
           'prediction': p} for ex, p in zip(examples, predictions)]


def score_predictions(task, examples, predictions: Sequence[str]) -> tuple[dict[str, float], list, list]:
  """(metrics, postprocessed targets, postprocessed predictions) with the task's postprocessor."""
  vocabulary = task.output_features['targets'].vocabulary
  targets = [task.postprocess_fn(_text(ex, 'targets', vocabulary), example=ex, is_target=True)
             for ex in examples]
  processed = [task.postprocess_fn(p, example=ex, is_target=False) for ex, p in zip(examples, predictions)]
  metrics = {}
  for fn in task.predict_metric_fns:
    metrics.update(fn(targets, processed))
  return {k: float(v) for k, v in metrics.items()}, targets, processed


def _invalid_predictions(task_name: str, predictions: Sequence[str]) -> Optional[list[str]]:
  from tasks import superglue  # pylint: disable=g-import-not-at-top
  try:
    return superglue.invalid_predictions(task_name, predictions)
  except ValueError:  # not a SuperGLUE task with a submission file
    return None


def inference_eval_task(evaluator, params, task, cfg: data_lib.DatasetConfig, step: int,
                        eval_output_dir: str, max_batches: Optional[int] = None, method: str = 'greedy',
                        print_fn=print) -> dict[str, float]:
  """Decodes, postprocesses and scores one task; writes t5x's inference_eval/ files. Returns the metrics."""
  examples, predictions, _ = predict_task(evaluator, params, task, cfg, max_batches, method)
  metrics, targets, processed = score_predictions(task, examples, predictions)
  invalid = _invalid_predictions(task.name, predictions)
  if invalid is not None:
    # Counted as errors by the metrics; reported so that a model emitting garbage is seen as such.
    metrics['invalid_predictions'] = float(len(invalid))
  if jax.process_index() == 0:
    write_inference_eval(eval_output_dir, task.name, step, metrics,
                         prediction_records(task, examples, predictions), targets, processed)
  print_fn(f'{task.name} ({cfg.split}) at step {step}, {len(examples)} examples decoded: '
           + '  '.join(f'{k} {v:.2f}' for k, v in metrics.items()))
  return metrics


def write_inference_eval(eval_output_dir: str, name: str, step: int, metrics: Mapping[str, float],
                         records: Sequence[dict], targets: Sequence, processed: Sequence) -> None:
  directory = fileio.join(eval_output_dir, 'inference_eval')
  fileio.makedirs(directory)
  with fileio.open(fileio.join(directory, f'{name}-metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'step': step, **metrics}) + '\n')
  with fileio.open(fileio.join(directory, f'{name}-{step:06d}.jsonl'), 'w', encoding='utf-8') as f:
    for record, target, prediction in zip(records, targets, processed):
      f.write(json.dumps({**record, 'target_postprocessed': _jsonable(target),
                          'prediction_postprocessed': _jsonable(prediction)}) + '\n')
  summaries.write_scalars(fileio.join(directory, name), step, {f'eval/{k}': v for k, v in metrics.items()})


def format_results(name: str, split: str, step: int, results: dict[str, float]) -> str:
  lines = [f'{name} ({split}) at step {step}, {int(results["target_tokens"]):,} target tokens:',
           f'  loss {results["loss"]:.4f}  cross_ent_loss {results["cross_ent_loss"]:.4f}  '
           f'accuracy {results["accuracy"]:.4f}  bits/token {results["bits_per_token"]:.4f}']
  if 'bits_per_byte' in results:
    lines.append(f'  bits/byte {results["bits_per_byte"]:.4f}')
  layers = sorted({k.rsplit('/', 1)[0] for k in results if k.startswith('layer/')})
  for layer in layers:
    usage = results.get(f'{layer}/expert_usage', float('nan'))
    dropped = results.get(f'{layer}/fraction_tokens_left_behind', float('nan'))
    confidence = results.get(f'{layer}/router_confidence', float('nan'))
    lines.append(f'  {layer[len("layer/"):]:<22s} expert usage {usage:.3f}  tokens dropped {dropped:.2%}  '
                 f'router confidence {confidence:.3f}')
  return '\n'.join(lines)


if __name__ != '__main__':
  evaluate = gin.configurable('evaluate', module='eval_script')(evaluate)


def _main(flags) -> None:
  del flags
  cli.call_configurable(evaluate, 'evaluate')


def main(argv=None) -> None:
  cli.run_main(_main, 'Evaluate an ST-MoE checkpoint (teacher-forced; t5x-style gin).', argv)


if __name__ == '__main__':
  from st_moe_jax import evaluate as _registered  # pylint: disable=g-import-not-at-top
  _registered.main()
