r"""Inference entry point (t5x's infer.py, mode 'predict'): decodes a split with a checkpoint.

  python -m st_moe_jax.infer --gin_file=gin/runs/infer.gin --gin_file=gin/models/st_moe_tiny.gin \
      --gin.CHECKPOINT_PATH="'runs/demo'" --gin.INFER_OUTPUT_DIR="'runs/demo/infer'" \
      --gin.MIXTURE_OR_TASK_NAME="'stdlib_span_corruption'" \
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 256, 'targets': 64}"

Writes INFER_OUTPUT_DIR/<task>-predict.jsonl-<shard:05>-of-<num_shards:05>, one JSON object per example:
{"inputs": ..., "targets": ..., "prediction": ..., "prediction_tokens": [...]} (texts decoded with the
task's vocabulary), then a `.COMPLETED` marker beside it. Encoder-decoders decode from the encoder input;
decoder-only models continue the first half of each target sequence (the prompt) to its length.
"""

import json
import os
from typing import Any, Optional

import gin
import jax
import numpy as np

from st_moe_jax import data as data_lib
from st_moe_jax import decoding
from st_moe_jax import evaluate as evaluate_lib
from st_moe_jax import train as train_lib


def _text(vocabulary, tokens: np.ndarray) -> str:
  tokens = [int(t) for t in tokens if t > 0]
  return vocabulary.decode(tokens)


def infer(*, model: Any = gin.REQUIRED, checkpoint_path: Optional[str] = gin.REQUIRED,
          infer_output_dir: Optional[str] = gin.REQUIRED,
          dataset_cfg: data_lib.DatasetConfig = gin.REQUIRED, max_batches: Optional[int] = None,
          method: str = 'greedy', num_expert_partitions: int = 1, num_model_partitions: int = 1,
          shard_id: int = 0, num_shards: int = 1) -> str:
  """Decodes dataset_cfg's split (max_batches batches, None: all); returns the output file's path."""
  from tasks import common  # pylint: disable=g-import-not-at-top
  checkpoint_path = train_lib.required(checkpoint_path, 'CHECKPOINT_PATH', '"\'runs/my_run\'"')
  infer_output_dir = train_lib.required(infer_output_dir, 'INFER_OUTPUT_DIR', '"\'runs/my_run/infer\'"')
  trainer, params, _, ds = evaluate_lib.restore_trainer(model, checkpoint_path, dataset_cfg,
                                                        num_expert_partitions, num_model_partitions)
  vocabulary = common.get_task_or_mixture(dataset_cfg.mixture_or_task_name).output_features[
      'targets'].vocabulary
  name = dataset_cfg.mixture_or_task_name
  os.makedirs(infer_output_dir, exist_ok=True)
  path = os.path.join(infer_output_dir, f'{name}-predict.jsonl-{shard_id:05d}-of-{num_shards:05d}')
  encoder_decoder = trainer.kind == data_lib.ENCODER_DECODER
  rows = dataset_cfg.batch_size // jax.process_count()
  with open(path, 'w') as f:
    for i, batch in enumerate(data_lib.DataIterator(ds)):
      if max_batches is not None and i >= max_batches:
        break
      real = batch['decoder_target_tokens'].shape[0]
      batch = data_lib.pad_batch(batch, rows)
      targets = batch['decoder_target_tokens']
      length = targets.shape[1]
      if encoder_decoder:
        tokens, _ = decoding.generate(trainer.model, params, max_decode_length=length, method=method,
                                      encoder_input_tokens=batch['encoder_input_tokens'])
        inputs = batch['encoder_input_tokens']
      else:  # continue the first half of each sequence
        prompt = np.where(np.arange(length)[None] < length // 2, targets, 0)
        tokens, _ = decoding.generate(trainer.model, params, max_decode_length=length, method=method,
                                      prompt=prompt)
        inputs = prompt
      tokens = np.asarray(jax.device_get(tokens))
      for row in range(real):
        f.write(json.dumps({'inputs': _text(vocabulary, inputs[row]),
                            'targets': _text(vocabulary, targets[row]),
                            'prediction': _text(vocabulary, tokens[row]),
                            'prediction_tokens': tokens[row].tolist()}) + '\n')
  open(path + '.COMPLETED', 'w').close()
  print(f'Wrote predictions to {path}', flush=True)
  return path


if __name__ != '__main__':
  infer = gin.configurable('infer', module='infer_script')(infer)


def _main(flags) -> None:
  del flags
  train_lib.call_configurable(infer, 'infer')


def main(argv=None) -> None:
  train_lib.run_main(_main, 'Decode a split with an ST-MoE checkpoint (t5x-style gin).', argv)


if __name__ == '__main__':
  from st_moe_jax import infer as _registered  # pylint: disable=g-import-not-at-top
  _registered.main()
