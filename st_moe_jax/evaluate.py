r"""Evaluation entry point (t5x's eval.py): restores CHECKPOINT_PATH and evaluates on a split.

  python -m st_moe_jax.evaluate --gin_file=gin/runs/eval.gin --gin_file=gin/models/st_moe_tiny.gin \
      --gin.CHECKPOINT_PATH="'runs/demo'" --gin.EVAL_OUTPUT_DIR="'runs/demo/eval'" \
      --gin.MIXTURE_OR_TASK_NAME="'stdlib_span_corruption'" \
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 256, 'targets': 64}"

Reports teacher-forced loss, accuracy, bits per token and, for a byte vocabulary, bits per byte, plus each
MoE layer's expert usage and fraction of tokens dropped. Results go to the console, to
EVAL_OUTPUT_DIR/<task>-metrics.jsonl (one line per evaluation) and to TensorBoard under
EVAL_OUTPUT_DIR/eval/<task>. Tasks with seqio metric functions are also decoded (greedy) and scored.
"""

import json
import os
from typing import Any, Optional

import gin
import jax

from st_moe_jax import checkpoint_manager as ckpt_lib
from st_moe_jax import data as data_lib
from st_moe_jax import optim
from st_moe_jax import train as train_lib
from st_moe_jax import trainer as trainer_lib


def restore_trainer(model: Any, checkpoint_path: str, dataset_cfg: data_lib.DatasetConfig,
                    num_expert_partitions: int, num_model_partitions: int):
  """(trainer, params, step, batches) for evaluating `model` from a checkpoint on dataset_cfg."""
  mesh = train_lib.create_mesh(num_expert_partitions, num_model_partitions, model)
  train_lib.check_batch(dataset_cfg.batch_size, mesh)
  kind = data_lib.model_kind_of(model)
  ds = data_lib.get_dataset(dataset_cfg, kind, num_processes=jax.process_count(),
                            shard=data_lib.shard_info())
  first = next(data_lib.DataIterator(ds))
  trainer = trainer_lib.Trainer(model, optim.adafactor, optim.constant_schedule(0.0), mesh)
  trainer.prepare(data_lib.pad_batch(first, dataset_cfg.batch_size // jax.process_count()))
  params, _ = ckpt_lib.restore_params(checkpoint_path, trainer.abstract_params)
  step = ckpt_lib.checkpoint_step(ckpt_lib.resolve_checkpoint_dir(checkpoint_path))
  return trainer, params, step, ds


def evaluate(*, model: Any = gin.REQUIRED, checkpoint_path: Optional[str] = gin.REQUIRED,
             eval_output_dir: Optional[str] = gin.REQUIRED,
             dataset_cfg: data_lib.DatasetConfig = gin.REQUIRED, eval_steps: Optional[int] = None,
             num_expert_partitions: int = 1, num_model_partitions: int = 1,
             print_fn=print) -> dict[str, float]:
  """Teacher-forced metrics of the checkpoint on dataset_cfg's split (all of it unless eval_steps)."""
  checkpoint_path = train_lib.required(checkpoint_path, 'CHECKPOINT_PATH', '"\'runs/my_run\'"')
  eval_output_dir = train_lib.required(eval_output_dir, 'EVAL_OUTPUT_DIR', '"\'runs/my_run/eval\'"')
  trainer, params, step, ds = restore_trainer(model, checkpoint_path, dataset_cfg, num_expert_partitions,
                                              num_model_partitions)
  rows = dataset_cfg.batch_size // jax.process_count()
  batches = (data_lib.pad_batch(b, rows) for b in data_lib.DataIterator(ds))
  results = trainer_lib.evaluate(trainer, params, batches, rows, eval_steps)
  name = dataset_cfg.mixture_or_task_name
  if jax.process_index() == 0:
    os.makedirs(eval_output_dir, exist_ok=True)
    with open(os.path.join(eval_output_dir, f'{name}-metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': step, 'split': dataset_cfg.split, **results}) + '\n')
    writer = trainer_lib.SummaryWriter(os.path.join(eval_output_dir, 'eval', name))
    writer.write(step, {k: v for k, v in results.items() if not k.startswith('layer/')})
    writer.close()
  print_fn(format_results(name, dataset_cfg.split, step, results))
  return results


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
  train_lib.call_configurable(evaluate, 'evaluate')


def main(argv=None) -> None:
  train_lib.run_main(_main, 'Evaluate an ST-MoE checkpoint (teacher-forced; t5x-style gin).', argv)


if __name__ == '__main__':
  from st_moe_jax import evaluate as _registered  # pylint: disable=g-import-not-at-top
  _registered.main()
