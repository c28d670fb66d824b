"""Preemption soak: a tiny training run killed again and again (SIGKILL, SIGTERM) at random moments, with
its latest checkpoint sometimes damaged in between, must end bitwise equal to an uninterrupted run.

  python scripts/soak_preemption.py --kills 8 --steps 40 [--seed 0] [--out_dir /tmp/soak]

Prints one line per interruption and a JSON summary: kills by signal, SIGTERM saves, checkpoints found
damaged and moved aside, restarts, and whether params and optimizer state equal the reference.
"""

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--gin.EMBED_DIM=32', '--gin.MLP_DIM=48', '--gin.NUM_HEADS=2', '--gin.HEAD_DIM=16',
        '--gin.NUM_EXPERTS=4', '--gin.EXPERT_MLP_DIM=32', '--gin.GROUP_SIZE=64']
# No TPU here: JAX goes straight to the CPU even where libtpu is installed (requirements-test.txt).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ENV = {**os.environ, 'PYTHONPATH': REPO, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
       'TF_CPP_MIN_LOG_LEVEL': '3'}


def command(model_dir: str, steps: int) -> list[str]:
  return [sys.executable, '-m', 'st_moe_jax.train', '--gin_file=gin/runs/pretrain.gin',
          '--gin_file=gin/models/st_moe_tiny.gin', '--gin_file=gin/runs/decoder_only.gin',
          '--gin.MIXTURE_OR_TASK_NAME="stdlib_lm"', "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
          '--gin.BATCH_SIZE=8', *TINY, f'--gin.MODEL_DIR="{model_dir}"', f'--gin.TRAIN_STEPS={steps}',
          '--gin.LOG_PERIOD=1', '--gin.EVAL_PERIOD=0', '--gin.CHECKPOINT_PERIOD=3']


def steps_saved(model_dir: str) -> list[int]:
  return sorted(int(p.rsplit('_', 1)[1]) for p in glob.glob(os.path.join(model_dir, 'checkpoint_*'))
                if p.rsplit('_', 1)[1].isdigit())


def damage_latest(model_dir: str, rng: random.Random) -> str:
  """Truncates one array file of the latest checkpoint's params (what a half-written disk block leaves)."""
  latest = steps_saved(model_dir)[-1]
  files = [f for f in glob.glob(os.path.join(model_dir, f'checkpoint_{latest}', 'params', '**', '*'),
                                recursive=True) if os.path.isfile(f) and os.path.getsize(f) > 64
           and '/d/' in f]
  victim = rng.choice(sorted(files))
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 2)
  return f'checkpoint_{latest}'


def restore(model_dir: str, step: int, item: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.PyTreeCheckpointer().restore(os.path.join(model_dir, f'checkpoint_{step}', item))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=8)
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--damage_every', type=int, default=2, help='damage the latest checkpoint after every '
                      'n-th interruption (0: never)')
  parser.add_argument('--out_dir', default=None)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  out = args.out_dir or tempfile.mkdtemp(prefix='soak_')
  reference, soaked = os.path.join(out, 'reference'), os.path.join(out, 'soaked')
  for d in (reference, soaked):
    shutil.rmtree(d, ignore_errors=True)
  start = time.time()
  straight = subprocess.Popen(command(reference, args.steps), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
  counts = {'SIGKILL': 0, 'SIGTERM': 0, 'sigterm_saves': 0, 'damaged': 0, 'moved_aside': 0, 'restarts': 0}
  while True:
    process = subprocess.Popen(command(soaked, args.steps), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    killing = counts['SIGKILL'] + counts['SIGTERM'] < args.kills
    # Kill after a random number of this process's step lines (1-6): mid-save, mid-step or idle.
    after, seen, output = rng.randint(1, 6), 0, []
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    for line in process.stdout:
      output.append(line)
      if line.startswith('step ') and killing:
        seen += 1
        if seen == after:
          time.sleep(rng.random() * 0.5)
          process.send_signal(sig)
          break
    rest, _ = process.communicate(timeout=600)
    output += rest.splitlines(keepends=True)
    text = ''.join(output)
    counts['moved_aside'] += text.count('and trying the previous checkpoint')
    if process.returncode == 0 and not any(l.startswith('Preempted') for l in output):
      if 'is already at step' in text or f'step {args.steps:>6d}/' in text:
        break
    if not killing:
      raise SystemExit(f'the final run failed:\n{text[-3000:]}')
    name = signal.Signals(sig).name
    counts[name] += 1
    counts['restarts'] += 1
    saved = 'Preempted (SIGTERM)' in text
    counts['sigterm_saves'] += saved
    note = ''
    if args.damage_every and counts['restarts'] % args.damage_every == 0 and len(steps_saved(soaked)) >= 2:
      note = f', damaged {damage_latest(soaked, rng)}'
      counts['damaged'] += 1
    print(f'{name} after {seen} step lines (exit {process.returncode}{", saved" if saved else ""}); '
          f'checkpoints {steps_saved(soaked)}{note}', flush=True)
  straight.communicate(timeout=600)
  import warnings  # pylint: disable=g-import-not-at-top
  warnings.filterwarnings('ignore', message='Sharding info not provided')
  import jax  # pylint: disable=g-import-not-at-top
  equal = {}
  for item in ('params', 'opt_state'):
    a, b = restore(reference, args.steps, item), restore(soaked, args.steps, item)
    equal[item] = all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))
  summary = {'steps': args.steps, **counts, 'bitwise_equal': equal,
             'corrupt_dirs_kept': len(glob.glob(os.path.join(soaked, '*.corrupt-*'))),
             'wall_s': round(time.time() - start, 1)}
  print(json.dumps(summary))
  if not all(equal.values()):
    sys.exit(1)


if __name__ == '__main__':
  main()
