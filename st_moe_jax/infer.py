r"""Inference entry point (t5x's infer.py, mode 'predict'): decodes a split with a checkpoint.

  python -m st_moe_jax.infer --gin_file=gin/runs/infer.gin --gin_file=gin/models/st_moe_tiny.gin \
      --gin.CHECKPOINT_PATH="'runs/demo'" --gin.INFER_OUTPUT_DIR="'runs/demo/infer'" \
      --gin.MIXTURE_OR_TASK_NAME="'stdlib_span_corruption'" \
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 256, 'targets': 64}"

Writes INFER_OUTPUT_DIR/<task>-predict.jsonl-<shard:05>-of-<num_shards:05>, one JSON object per example:
{"inputs": ..., "targets": ..., "prediction": ..., "prediction_tokens": [...]} (texts decoded with the
task's vocabulary), then a `.COMPLETED` marker beside it. Encoder-decoders decode from the encoder input,
a mixture task by task (one file per task that has the split); decoder-only models continue the first
half of each target sequence (the prompt) to its length.

SuperGLUE leaderboard: for SuperGLUE tasks (super_glue_*_v102, their _t5vocab twins, the mixture) the
official submission files are written beside the predictions: INFER_OUTPUT_DIR/BoolQ.jsonl, CB.jsonl, ...
(tasks.superglue.write_submission; run on the 'test' split, INFER_SPLIT = 'test').
"""

import st_moe_jax  # pylint: disable=g-bad-import-order  (first: TensorFlow's start-up lines are dropped)
if __name__ == '__main__':  # a line within the first second: the imports below take several
  print('st_moe_jax.infer: loading JAX and TensorFlow...', flush=True)
st_moe_jax.import_tensorflow_quietly()

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
from typing import Any, Optional

import gin
import jax
import numpy as np

from st_moe_jax import cli
from st_moe_jax import data as data_lib
from st_moe_jax import decoding
from st_moe_jax import evaluate as evaluate_lib
from st_moe_jax import fileio
from st_moe_jax import summaries


def _text(vocabulary, tokens: np.ndarray) -> str:
  tokens = [int(t) for t in tokens if t > 0]
  return vocabulary.decode(tokens)


def infer(*, model: Any = gin.REQUIRED, checkpoint_path: Optional[str] = gin.REQUIRED,
          infer_output_dir: Optional[str] = gin.REQUIRED,
          dataset_cfg: data_lib.DatasetConfig = gin.REQUIRED, max_batches: Optional[int] = None,
          method: str = 'greedy', num_expert_partitions: int = 1, num_model_partitions: int = 1,
          shard_id: int = 0, num_shards: int = 1, write_submissions: bool = True) -> list[str]:
  """Decodes dataset_cfg's split (max_batches batches, None: all); returns the paths written."""
  checkpoint_path = cli.required(checkpoint_path, 'CHECKPOINT_PATH', '"\'runs/my_run\'"')
  infer_output_dir = cli.required(infer_output_dir, 'INFER_OUTPUT_DIR', '"\'runs/my_run/infer\'"')
  cli.check_checkpoint_path(checkpoint_path)
  tasks = evaluate_lib.tasks_with_split(dataset_cfg.mixture_or_task_name, dataset_cfg.split)
  cfgs = [dataclasses.replace(dataset_cfg, mixture_or_task_name=t.name) for t in tasks]
  # INFER_OUTPUT_DIR is created and checked for writing before anything is decoded.
  evaluator, params, _, _ = evaluate_lib.restore_evaluator(model, checkpoint_path, cfgs[0],
                                                            num_expert_partitions, num_model_partitions,
                                                            output_dir=('INFER_OUTPUT_DIR', infer_output_dir))
  suffix = f'-predict.jsonl-{shard_id:05d}-of-{num_shards:05d}'
  if evaluator.kind != data_lib.ENCODER_DECODER:
    path = fileio.join(infer_output_dir, dataset_cfg.mixture_or_task_name + suffix)
    return [_infer_decoder_only(evaluator, params, dataset_cfg, path, max_batches, method)]
  paths = []
  for task, cfg in zip(tasks, cfgs):
    examples, predictions, tokens = evaluate_lib.predict_task(evaluator, params, task, cfg, max_batches,
                                                              method)
    records = evaluate_lib.prediction_records(task, examples, predictions)
    for record, toks in zip(records, tokens):
      record['prediction_tokens'] = [int(t) for t in toks]
    paths.append(_write_jsonl(fileio.join(infer_output_dir, task.name + suffix), records))
    if write_submissions and _has_submission_file(task.name):
      paths.append(_write_submission(infer_output_dir, task.name, examples, predictions, cfg.split))
  return paths


def _write_jsonl(path: str, records) -> str:
  with fileio.open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
  fileio.write_text(path + '.COMPLETED', '')
  print(f'Wrote predictions to {path}', flush=True)
  return path


def _has_submission_file(task_name: str) -> bool:
  from tasks import superglue  # pylint: disable=g-import-not-at-top
  try:
    superglue.submission_filename(task_name)
  except ValueError:
    return False
  return True


def _write_submission(output_dir: str, task_name: str, examples, predictions, split: str) -> str:
  from tasks import superglue  # pylint: disable=g-import-not-at-top
  path = superglue.write_submission(output_dir, task_name, examples, predictions)
  note = '' if split == 'test' else f' (from the {split!r} split; the leaderboard wants INFER_SPLIT=\'test\')'
  print(f'Wrote the SuperGLUE submission file {path}{note}', flush=True)
  invalid = superglue.invalid_predictions(task_name, predictions)
  if invalid:
    print(f'WARNING: {len(invalid)} of {len(predictions)} {task_name} predictions are not a label '
          f'(e.g. {invalid[:3]}); the submission file has the first label for them (every example needs '
          'one).', flush=True)
  return path


def _infer_decoder_only(evaluator, params, dataset_cfg: data_lib.DatasetConfig, path: str,
                        max_batches: Optional[int], method: str) -> str:
  """Continues the first half of each target sequence (the prompt) to its length."""
  from tasks import common  # pylint: disable=g-import-not-at-top
  vocabulary = common.get_task_or_mixture(dataset_cfg.mixture_or_task_name).output_features[
      'targets'].vocabulary
  ds = data_lib.get_dataset(dataset_cfg, evaluator.kind, num_processes=jax.process_count(),
                            shard=data_lib.shard_info())
  rows = dataset_cfg.batch_size // jax.process_count()
  records = []
  progress = summaries.Progress(f'decoding {dataset_cfg.mixture_or_task_name} ({dataset_cfg.split})',
                                max_batches)
  for i, batch in enumerate(data_lib.DataIterator(ds)):
    if max_batches is not None and i >= max_batches:
      break
    real = batch['decoder_target_tokens'].shape[0]
    targets = data_lib.pad_batch(batch, rows)['decoder_target_tokens']
    length = targets.shape[1]
    prompt = np.where(np.arange(length)[None] < length // 2, targets, 0)
    tokens, _ = decoding.generate(evaluator.model, params, max_decode_length=length, method=method,
                                  prompt=prompt)
    tokens = np.asarray(jax.device_get(tokens))
    records += [{'inputs': _text(vocabulary, prompt[row]), 'targets': _text(vocabulary, targets[row]),
                 'prediction': _text(vocabulary, tokens[row]), 'prediction_tokens': tokens[row].tolist()}
                for row in range(real)]
    progress.update()
  progress.done()
  return _write_jsonl(path, records)


if __name__ != '__main__':
  infer = gin.configurable('infer', module='infer_script')(infer)


def _main(flags) -> None:
  del flags
  cli.call_configurable(infer, 'infer')


def main(argv=None) -> None:
  cli.run_main(_main, 'Decode a split with an ST-MoE checkpoint (t5x-style gin).', argv)


if __name__ == '__main__':
  from st_moe_jax import infer as _registered  # pylint: disable=g-import-not-at-top
  _registered.main()
