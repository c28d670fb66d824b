"""Benchmark: tokens per second of a full training step, MoE against dense, side by side in one process.

A training step is the real trainer's (st_moe_jax.trainer.Trainer.train_step): forward, backward, the
loss with z-loss and the MoE losses, and the Adafactor update, jit-compiled with donated state on a
one-device mesh. For each size (--configs) it times three models built from the gin files:

  dense    the dense T5 1.1 model with the same activated FLOPs per token (gin/models/t5_1_1_<size>_dense.gin),
  gather   the ST-MoE model (gin/models/st_moe_<size>.gin) with the default gather dispatch,
  einsum   the same ST-MoE model with the one-hot einsum dispatch (DISPATCH_METHOD='einsum'),

each compiled and warmed up (2 steps), then --repeats steps per model, the models interleaved step by step
so that a noisy machine slows them alike; the median step time gives tokens/s. Tokens per step count every
position of the batch: B·(Le + Ld) with random byte tokens, all real (no padding), Ld = Le / 4 as for span
corruption. One JSON line per size with each model's tokens/s and the ratios; the target (issue 4) is
gather ≥ 0.75× dense.

Defaults take about 5 minutes on 2 CPU cores (tiny: 16×256 encoder + 16×64 decoder tokens;
small: 16×128 + 16×32, activations float32 unless --activation_dtype says otherwise). At small batches the
step of st_moe_small is dominated by the Adafactor update of its 3× more parameters (278M against 90M),
which the per-token work cannot amortise: at 4×128 it measured 0.43× dense, at 16×128 0.82×.

  python scripts/bench_train_step.py
  python scripts/bench_train_step.py --configs tiny --tiny_shape 32x512 --repeats 9
  python scripts/bench_train_step.py --configs small --activation_dtype bfloat16
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import st_moe_jax  # noqa: E402  (sets the TF log level before anything imports TensorFlow)

st_moe_jax.import_tensorflow_quietly()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from st_moe_jax import data as data_lib  # noqa: E402
from st_moe_jax import gin_setup  # noqa: E402
from st_moe_jax import optim  # noqa: E402
from st_moe_jax import partitioning  # noqa: E402
from st_moe_jax import trainer as trainer_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILES = {  # size -> (MoE gin, dense gin with the same activated FLOPs)
    'tiny': ('gin/models/st_moe_tiny.gin', 'gin/models/t5_1_1_tiny_dense.gin'),
    'small': ('gin/models/st_moe_small.gin', 'gin/models/t5_1_1_small_dense.gin'),
}
TARGET_RATIO = 0.75


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--configs', default='tiny,small', help='comma-separated sizes: tiny, small')
  parser.add_argument('--tiny_shape', default='16x256', help='BATCHxENCODER_LENGTH for tiny (Ld = Le/4)')
  parser.add_argument('--small_shape', default='16x128', help='BATCHxENCODER_LENGTH for small (Ld = Le/4)')
  parser.add_argument('--activation_dtype', default='float32',
                      help="ACTIVATION_DTYPE for every model ('float32', 'bfloat16'); 'gin' keeps the gin "
                           "file's (st_moe_small: bfloat16, slow on CPU)")
  parser.add_argument('--repeats', type=int, default=5, help='timed steps per model (median); at least 5')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps per model (the first compiles)')
  parser.add_argument('--skip_einsum', action='store_true', help='do not time the einsum dispatch')
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args(argv)


def parse_shape(text: str) -> tuple[int, int]:
  batch, length = (int(v) for v in text.lower().split('x'))
  if length < 4 or batch < 1:
    raise ValueError(f'Shape {text!r}: need BATCHxLENGTH with BATCH >= 1 and LENGTH >= 4.')
  return batch, length


def build_model(gin_file: str, bindings: list[str]):
  gin_setup.parse_model_gin([os.path.join(REPO, gin_file)], bindings, search_paths=(REPO,))
  model = gin_setup.architecture()
  vocab = gin_setup.macro('NUM_EMBEDDINGS')
  return model, vocab


def random_batch(batch: int, enc_len: int, dec_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  """Encoder-decoder batch of random real tokens (ids 3..min(vocab, 259)-1: bytes for a byte vocabulary)."""
  rng = np.random.default_rng(seed)
  high = min(vocab, 259)
  targets = rng.integers(3, high, (batch, dec_len), dtype=np.int32)
  return {
      'encoder_input_tokens': rng.integers(3, high, (batch, enc_len), dtype=np.int32),
      'decoder_input_tokens': np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1),
      'decoder_target_tokens': targets,
      'decoder_loss_weights': np.ones((batch, dec_len), np.int32),
  }


def num_params(trainer) -> int:
  return int(sum(x.size for x in jax.tree.leaves(trainer.abstract_params)))


def bench_size(size: str, shape: tuple[int, int], args) -> dict:
  batch_size, enc_len = shape
  dec_len = max(enc_len // 4, 1)
  mesh = partitioning.create_mesh(jax.devices()[:1])
  dtype_binding = [] if args.activation_dtype == 'gin' else [f"ACTIVATION_DTYPE = '{args.activation_dtype}'"]
  moe_file, dense_file = MODEL_FILES[size]
  specs = {'dense': (dense_file, []), 'gather': (moe_file, ["DISPATCH_METHOD = 'gather'"])}
  if not args.skip_einsum:
    specs['einsum'] = (moe_file, ["DISPATCH_METHOD = 'einsum'"])

  runs, compile_s, params = {}, {}, {}
  batch = None
  for name, (gin_file, bindings) in specs.items():
    model, vocab = build_model(gin_file, bindings + dtype_binding)
    if batch is None:
      batch = random_batch(batch_size, enc_len, dec_len, vocab, args.seed)
    trainer = trainer_lib.Trainer(model, optim.adafactor, optim.rsqrt_schedule(1.0, 10_000), mesh,
                                  model_kind=data_lib.ENCODER_DECODER, seed=args.seed)
    trainer.prepare(batch)
    state = trainer.init_state()
    start = time.perf_counter()
    for _ in range(max(args.warmup, 1)):
      state, metrics = trainer.train_step(state, batch)
      jax.block_until_ready((state, metrics))
      if name not in compile_s:
        compile_s[name] = time.perf_counter() - start
    runs[name] = [trainer, state]
    params[name] = num_params(trainer)

  times = {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, run in runs.items():
      trainer, state = run
      start = time.perf_counter()
      state, metrics = trainer.train_step(state, batch)
      jax.block_until_ready((state, metrics))
      times[name].append(time.perf_counter() - start)
      run[1] = state
  seconds = {name: statistics.median(t) for name, t in times.items()}
  tokens = batch_size * (enc_len + dec_len)
  tps = {name: tokens / s for name, s in seconds.items()}
  result = {
      'config': size, 'moe_gin': moe_file, 'dense_gin': dense_file, 'batch': batch_size,
      'encoder_length': enc_len, 'decoder_length': dec_len, 'tokens_per_step': tokens,
      'activation_dtype': args.activation_dtype, 'repeats': args.repeats,
      'params': params,
      'ms_per_step': {n: round(1e3 * s, 1) for n, s in seconds.items()},
      'tokens_per_s': {n: round(v, 1) for n, v in tps.items()},
      'compile_and_first_step_s': {n: round(s, 1) for n, s in compile_s.items()},
      'moe_vs_dense': round(tps['gather'] / tps['dense'], 3),
      'target_moe_vs_dense': TARGET_RATIO,
      'meets_target': bool(tps['gather'] / tps['dense'] >= TARGET_RATIO),
  }
  if 'einsum' in tps:
    result['einsum_vs_dense'] = round(tps['einsum'] / tps['dense'], 3)
    result['gather_speedup_over_einsum'] = round(tps['gather'] / tps['einsum'], 3)
  return result


def main(argv=None):
  args = parse_args(argv)
  if args.repeats < 5:
    print(f'note: --repeats {args.repeats} < 5; medians of so few steps are noisy.', file=sys.stderr)
  shapes = {'tiny': parse_shape(args.tiny_shape), 'small': parse_shape(args.small_shape)}
  sizes = [s.strip() for s in args.configs.split(',') if s.strip()]
  unknown = [s for s in sizes if s not in MODEL_FILES]
  if unknown:
    sys.exit(f'Unknown --configs {unknown}; choose from {sorted(MODEL_FILES)}.')
  print(json.dumps({'devices': [str(d) for d in jax.devices()], 'jax': jax.__version__,
                    'cpu_count': os.cpu_count(),
                    'shapes': {s: {'batch': shapes[s][0], 'encoder_length': shapes[s][1],
                                   'decoder_length': max(shapes[s][1] // 4, 1)} for s in sizes},
                    'activation_dtype': args.activation_dtype}), flush=True)
  for size in sizes:
    print(json.dumps(bench_size(size, shapes[size], args)), flush=True)


if __name__ == '__main__':
  main()
