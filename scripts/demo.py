"""The main job: pretrain st_moe_tiny on the embedded corpus (this Python's standard library), evaluate it.

Runs the two user commands, exactly as a user would type them:

  python -m st_moe_jax.train    --gin_file=gin/runs/pretrain.gin --gin_file=gin/models/st_moe_tiny.gin
                                --gin_file=gin/runs/decoder_only.gin --gin.MIXTURE_OR_TASK_NAME="'stdlib_lm'" ...
  python -m st_moe_jax.evaluate --gin_file=gin/runs/eval.gin ... --gin.CHECKPOINT_PATH=<MODEL_DIR>

then prints the validation loss in bits per byte beside a unigram byte model fitted on the train files and
measured on the same validation files (tasks.pretraining.unigram_byte_baseline), and each MoE layer's expert
usage and fraction of tokens dropped.

Objective: st_moe_tiny's dims, experts and routing as a decoder-only language model (stdlib_lm). Bits per
byte is a statement about predicting every byte of the validation text, which is what a causal LM's loss
measures (and what the unigram baseline measures); span corruption predicts only the 15% of masked bytes
given both sides, so its loss is neither comparable with the baseline nor as quick to fall in a few minutes
on two CPU cores. The encoder-decoder objective is one flag away (see --objective).
"""

import argparse
import math
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model_dir', default=os.path.join(REPO, 'runs', 'demo'))
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--length', type=int, default=256)
  parser.add_argument('--learning_rate', type=float, default=1.0, help='BASE_LEARNING_RATE (rsqrt schedule)')
  parser.add_argument('--warmup_steps', type=int, default=100)
  parser.add_argument('--eval_steps', type=int, default=None,
                      help='validation batches for the final evaluation (default: the whole split)')
  parser.add_argument('--objective', choices=('lm', 'span_corruption'), default='lm')
  parser.add_argument('--keep', action='store_true', help='resume from an existing --model_dir')
  return parser.parse_args()


def command_line(args: list[str]) -> str:
  """The command as it can be pasted into a shell (from the repository root): shlex-quoted, so gin's inner
  quotes ('--gin.MODEL_DIR="runs/demo"') survive the shell."""
  python = sys.executable
  if python.startswith(REPO + os.sep):
    python = os.path.relpath(python, REPO)
  return shlex.join([python, '-m', *args])


def run(args: list[str]) -> None:
  print('$ ' + command_line(args), flush=True)
  env = {**os.environ, 'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
         'TF_CPP_MIN_LOG_LEVEL': '3'}
  subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, check=True)


def main():
  args = parse_args()
  start = time.time()
  if not args.keep and os.path.isdir(args.model_dir):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(args.model_dir)
  if args.objective == 'lm':
    task, lengths, extra = 'stdlib_lm', f"{{'targets': {args.length}}}", ['--gin_file=gin/runs/decoder_only.gin']
  else:
    task = 'stdlib_span_corruption'
    lengths, extra = f"{{'inputs': {args.length}, 'targets': {args.length // 4}}}", []
  common = ['--gin_file=gin/models/st_moe_tiny.gin', *extra, f'--gin.MIXTURE_OR_TASK_NAME="{task}"',
            f'--gin.TASK_FEATURE_LENGTHS={lengths}', f'--gin.BATCH_SIZE={args.batch_size}']
  run(['st_moe_jax.train', '--gin_file=gin/runs/pretrain.gin', *common,
       f'--gin.MODEL_DIR="{args.model_dir}"', f'--gin.TRAIN_STEPS={args.steps}',
       f'--gin.BASE_LEARNING_RATE={args.learning_rate}', f'--gin.WARMUP_STEPS={args.warmup_steps}',
       '--gin.LOG_PERIOD=100', f'--gin.EVAL_PERIOD={max(args.steps // 4, 1)}', '--gin.EVAL_STEPS=10',
       f'--gin.CHECKPOINT_PERIOD={max(args.steps // 2, 1)}', '--gin.KEEP_CHECKPOINTS=2'])
  train_s = time.time() - start
  eval_dir = os.path.join(args.model_dir, 'eval')
  run(['st_moe_jax.evaluate', '--gin_file=gin/runs/eval.gin', *common, '--gin.PACK=True',
       f'--gin.CHECKPOINT_PATH="{args.model_dir}"', f'--gin.EVAL_OUTPUT_DIR="{eval_dir}"',
       f'--gin.EVAL_STEPS={args.eval_steps}'])

  import json  # pylint: disable=g-import-not-at-top
  import st_moe_jax  # pylint: disable=g-import-not-at-top
  st_moe_jax.import_tensorflow_quietly()  # tasks import TensorFlow (through seqio): no start-up lines
  from tasks import pretraining  # pylint: disable=g-import-not-at-top
  with open(os.path.join(eval_dir, f'{task}-metrics.jsonl')) as f:
    results = json.loads(f.readlines()[-1])
  baseline = pretraining.unigram_byte_baseline()
  print('\n' + '=' * 78)
  print(f'st_moe_tiny ({args.objective}), {args.steps} steps of {args.batch_size}x{args.length} tokens, '
        f'trained in {train_s / 60:.1f} min; total {(time.time() - start) / 60:.1f} min')
  if args.objective == 'lm':
    bpb = results['bits_per_byte']
    print(f'validation bits per byte   model {bpb:.3f}   unigram byte baseline {baseline:.3f}   '
          f'({bpb / baseline:.0%} of the baseline)')
  else:
    print(f'validation span-corruption targets: {results["bits_per_token"]:.3f} bits per target token '
          f'(not comparable with the unigram baseline {baseline:.3f} bits/byte)')
  print('per-layer routing on the validation split (eval capacity factor):')
  for key in sorted(k for k in results if k.endswith('/expert_usage') and k.startswith('layer/')):
    layer = key[len('layer/'):-len('/expert_usage')]
    print(f'  {layer:<20s} expert usage {results[key]:.3f}   tokens dropped '
          f'{results[f"layer/{layer}/fraction_tokens_left_behind"]:.2%}')
  print('=' * 78)
  if args.objective == 'lm' and not (math.isfinite(bpb) and bpb < baseline):
    sys.exit('The model did not beat the unigram baseline.')


if __name__ == '__main__':
  main()
