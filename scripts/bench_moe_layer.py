"""Benchmark: forward + backward of one MoE FFN layer, side by side in one process.

For each number of experts E it times (jit-compiled, warmed up, median and minimum of --repeats runs, the variants
interleaved run by run so that a noisy machine slows them alike):
  gather    the MoeLayer with the fast gather dispatch,
  einsum    the same layer with the one-hot einsum reference dispatch,
  dropless  the same layer with dropless routing (no capacity: sorted rows, grouped matmuls),
  dense     the dense FFN with the same activated FLOPs (width k·F over all tokens),
and prints one JSON line with the ratios, the fraction of (token, expert) assignments dropped by the
capacity path and the compiled peak temporary memory of each.

Capacity convention: as in flaxformer, C = max(round(cf·T/E), min_capacity) counts tokens, not assignments.
To compare at equal work the default capacity factor is 1.25·k (2.5 for top-2), i.e. 1.25 slots per
assignment.

  python scripts/bench_moe_layer.py                      # 8×512 tokens, H 512, F 2048, top-2, E 8/32/64
  python scripts/bench_moe_layer.py --experts 8 --repeats 3 --length 128
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from st_moe_jax.layers import MlpBlock  # noqa: E402
from st_moe_jax.config import MoeConfig  # noqa: E402
from st_moe_jax.moe import MoeLayer  # noqa: E402


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--experts', default='8,32,64', help='comma-separated numbers of experts')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--length', type=int, default=512)
  parser.add_argument('--d_model', type=int, default=512)
  parser.add_argument('--d_ff', type=int, default=2048)
  parser.add_argument('--k', type=int, default=2, help='experts per token')
  parser.add_argument('--capacity_factor', type=float, default=None,
                      help='train capacity factor (default 1.25·k)')
  parser.add_argument('--group_size', type=int, default=4096, help='max tokens per routing group')
  parser.add_argument('--activation', default='geglu', choices=['geglu', 'relu'])
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=7, help="timed runs per variant (median and min)")
  parser.add_argument('--skip_einsum', action='store_true', help='do not time the einsum reference')
  parser.add_argument('--skip_dropless', action='store_true', help='do not time dropless routing')
  parser.add_argument('--dropless_tile', type=int, default=None,
                      help='rows per grouped-matmul tile (default: MoeConfig.dropless_tile_size)')
  return parser.parse_args(argv)


def time_fns(fns: dict, repeats: int) -> tuple[dict, dict]:
  """{name: (fn, args)} -> ({name: median seconds}, {name: min seconds}), the variants' runs interleaved.

  On a shared machine noise only adds time, so the minimum is the steadier estimate; both are printed.
  """
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, (fn, args) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return ({name: statistics.median(t) for name, t in times.items()},
          {name: min(t) for name, t in times.items()})


def peak_temp_bytes(fn, *args):
  analysis = fn.lower(*args).compile().memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def train_step_fn(module, upstream):
  """jit(value_and_grad) of <module(x), upstream> with respect to params and inputs."""

  def loss(params, x):
    y = module.apply({'params': params}, x, enable_dropout=True, rngs={'dropout': jax.random.PRNGKey(0)},
                     mutable=['intermediates'])[0]
    return jnp.sum(y.astype(jnp.float32) * upstream)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bench_one(num_experts, args):
  dtype = jnp.dtype(args.dtype)
  activations = ('gelu', 'linear') if args.activation == 'geglu' else ('relu',)
  capacity_factor = args.capacity_factor or 1.25 * args.k
  shape = (args.batch, args.length, args.d_model)
  x = jax.random.normal(jax.random.PRNGKey(1), shape, dtype)
  upstream = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float32)
  rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(3)}

  def moe_layer(method, **overrides):
    config = MoeConfig(num_experts=num_experts, expert_mlp_dim=args.d_ff, expert_activations=activations,
                       num_selected_experts=args.k, train_capacity_factor=capacity_factor,
                       group_size=args.group_size, group_multiple=1, dispatch_method=method, **overrides)
    return MoeLayer(config, dtype)

  result = {'num_experts': num_experts, 'tokens': args.batch * args.length, 'd_model': args.d_model,
            'd_ff': args.d_ff, 'k': args.k, 'capacity_factor': capacity_factor, 'dtype': args.dtype}
  gather_layer = moe_layer('gather')
  moe_params = jax.jit(lambda: gather_layer.init(rngs, x)['params'])()
  _, state = gather_layer.apply({'params': moe_params}, x, rngs=rngs, mutable=['intermediates'])
  usage = float(state['intermediates']['expert_usage'][0])
  tokens = args.batch * args.length
  num_groups = max(1, -(-tokens // args.group_size))
  capacity = max(int(round(capacity_factor * tokens / num_groups / num_experts)), 4)
  kept = usage * num_experts * capacity * num_groups
  result['capacity'] = capacity
  result['assignments_dropped'] = round(1.0 - kept / (args.k * tokens), 4)

  dense = MlpBlock(args.k * args.d_ff, activations, dtype=dtype)
  dense_params = jax.jit(lambda: dense.init(rngs, x)['params'])()
  variants = {'dense': (dense, dense_params), 'gather': (gather_layer, moe_params)}
  if not args.skip_einsum:
    variants['einsum'] = (moe_layer('einsum'), moe_params)
  if not args.skip_dropless:  # same parameters: dropless declares the experts as the capacity path does
    tile = {} if args.dropless_tile is None else {'dropless_tile_size': args.dropless_tile}
    variants['dropless'] = (moe_layer('gather', dropless=True, **tile), moe_params)
  steps, memory = {}, {}
  for name, (module, params) in variants.items():
    step = train_step_fn(module, upstream)
    steps[name] = (step, (params, x))
    memory[name] = peak_temp_bytes(step, params, x)
  seconds, fastest = time_fns(steps, args.repeats)
  result['ms'] = {name: round(1e3 * s, 2) for name, s in seconds.items()}
  result['ms_min'] = {name: round(1e3 * s, 2) for name, s in fastest.items()}
  for suffix, times in (('', seconds), ('_min', fastest)):  # ratios of medians, then of minima
    result['gather_vs_dense' + suffix] = round(times['gather'] / times['dense'], 3)
    if 'dropless' in times:
      result['dropless_vs_dense' + suffix] = round(times['dropless'] / times['dense'], 3)
    if 'einsum' in times:
      result['einsum_vs_dense' + suffix] = round(times['einsum'] / times['dense'], 3)
      result['gather_speedup_over_einsum' + suffix] = round(times['einsum'] / times['gather'], 3)
  result['peak_temp_mib'] = {n: None if b is None else round(b / 2**20, 1) for n, b in memory.items()}
  return result


def main(argv=None):
  args = parse_args(argv)
  print(json.dumps({'devices': [str(d) for d in jax.devices()], 'jax': jax.__version__,
                    'cpu_count': os.cpu_count()}), flush=True)
  for num_experts in [int(e) for e in args.experts.split(',')]:
    print(json.dumps(bench_one(num_experts, args)), flush=True)


if __name__ == '__main__':
  main()
