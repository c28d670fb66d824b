"""Router comparison: tiny language models on the embedded corpus, equal activated compute, equal tokens.

Trains, one after the other in this process (st_moe_jax.trainer.Trainer: jit-compiled step, Adafactor,
rsqrt schedule, z-loss and the MoE losses), on the same batches of the byte-level `stdlib_lm` task:

  dense            decoder-only, every FFN dense, width F·(L+S)/L (same activated FFN FLOPs as the MoEs)
  switch_top1      top-1 tokens-choose (Switch), experts of width 2F, capacity factor 1.25 (eval 2.0)
  st_moe_top2      top-2 tokens-choose (ST-MoE), experts of width F, capacity factor 2.5 (eval 4.0)
  sparsemixer_v2   GRIN's SparseMixer-v2 top-2, experts of width F, dropless (no capacity, nothing dropped)
  rmoe             RMoE: ST-MoE top-2 with the GRU router shared through depth (recurrent_router_dim 128)
  lory             Lory: segment-routed expert merging, one merged FFN of width 2F per segment
  experts_choose   encoder-decoder on `stdlib_span_corruption`: experts-choose in the encoder (capacity
                   factor 2, i.e. two experts per token on average), top-2 tokens-choose in the decoder

Every model has st_moe_tiny's shapes (d_model 128, 4 heads of 32, byte vocabulary, 8 experts) with L = 2
layers per stack and S = 1 sparse layer (layer 1), no ST-MoE extra FFN. Per token every decoder-only model
runs FFNs of total width 3F = 768 (F = 256), so activated compute is equal up to the routers (and Lory's
per-segment merge). Capacity counts tokens (routing.expert_capacity): 1.25 slots per assignment in
training for the capacity-limited routers. "Tokens dropped" is the sown `fraction_tokens_left_behind`:
tokens that reached no expert, averaged over training steps (train capacity) and over the validation
batches (eval capacity); a top-2 token that lost only its second expert is not counted.

The experts-choose model predicts span-corruption targets (15% of the bytes, given the rest) with an
encoder-decoder of 2+2 layers: its loss is per target token (sentinels included) and is NOT comparable with
the decoder-only models' bits per byte; it reads rows of --length encoder tokens (about 1.1·length raw
bytes each, the same text volume as a language-model row) and its tokens/s counts encoder + decoder tokens.

Outputs (--out_dir): router_comparison.md (the markdown table, the settings and the command),
router_comparison.png (validation loss against steps), router_comparison.json (all numbers). The table is
also printed.

  python scripts/compare_routers.py                     # default: 7 x 200 steps of 16x128, ~10 min on 2 CPU cores
  python scripts/compare_routers.py --quick             # smoke test, < 2 min
  python scripts/compare_routers.py --steps 600 --batch 16 --length 256 --routers dense,st_moe_top2
"""

import argparse
import json
import math
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import st_moe_jax  # noqa: E402  (sets the TF log level before anything imports TensorFlow)

st_moe_jax.import_tensorflow_quietly()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from st_moe_jax import data as data_lib  # noqa: E402
from st_moe_jax import models  # noqa: E402
from st_moe_jax import optim  # noqa: E402
from st_moe_jax import partitioning  # noqa: E402
from st_moe_jax import trainer as trainer_lib  # noqa: E402

ROUTERS = ('dense', 'switch_top1', 'st_moe_top2', 'sparsemixer_v2', 'rmoe', 'lory', 'experts_choose')
DESCRIPTIONS = {
    'dense': 'dense FFN (width 384)',
    'switch_top1': 'Switch top-1, cf 1.25',
    'st_moe_top2': 'ST-MoE top-2, cf 2.5',
    'sparsemixer_v2': 'SparseMixer-v2 top-2, dropless',
    'rmoe': 'RMoE (GRU router) top-2, cf 2.5',
    'lory': 'Lory segment merging',
    'experts_choose': 'experts-choose enc. (cf 2) + top-2 dec., enc-dec',
}
ENC_DEC = ('experts_choose',)
VOCAB = 384  # ByteVocabulary's 259 ids, rounded up to a multiple of 128 (st_moe_tiny)
D_MODEL, NUM_HEADS, HEAD_DIM, NUM_LAYERS, NUM_SPARSE, EXPERT_F = 128, 4, 32, 2, 1, 256


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=200, help='training steps per model')
  parser.add_argument('--batch', type=int, default=16, help='rows per batch')
  parser.add_argument('--length', type=int, default=128, help='tokens per row (encoder length for enc-dec)')
  parser.add_argument('--eval_every', type=int, default=25, help='steps between validation evaluations')
  parser.add_argument('--eval_batches', type=int, default=8, help='validation batches per evaluation')
  parser.add_argument('--out_dir', default='runs/compare_routers')
  parser.add_argument('--routers', default=','.join(ROUTERS), help=f'comma-separated subset of {ROUTERS}')
  parser.add_argument('--num_experts', type=int, default=8)
  parser.add_argument('--segment_length', type=int, default=None, help="Lory's T (default length/4)")
  parser.add_argument('--learning_rate', type=float, default=1.0, help='base of the rsqrt schedule')
  parser.add_argument('--warmup_steps', type=int, default=100, help='rsqrt schedule: constant until here')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true',
                      help='smoke test: 20 steps of 8x64, eval every 10 steps on 2 batches (< 2 min)')
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.batch, args.length, args.eval_every, args.eval_batches = 20, 8, 64, 10, 2
  args.routers = [r.strip() for r in args.routers.split(',') if r.strip()]
  unknown = [r for r in args.routers if r not in ROUTERS]
  if unknown:
    parser.error(f'unknown --routers {unknown}; choose from {ROUTERS}')
  if min(args.steps, args.batch, args.length, args.eval_every, args.eval_batches) < 1:
    parser.error('--steps, --batch, --length, --eval_every and --eval_batches must be >= 1')
  args.segment_length = args.segment_length or max(args.length // 4, 1)
  return args


# ---------------------------------------------------------------------------------------------------------
# Models with equal activated compute.

def transformer_config(mlp_dim: int) -> models.TransformerConfig:
  return models.TransformerConfig(vocab_size=VOCAB, embed_dim=D_MODEL, num_heads=NUM_HEADS, head_dim=HEAD_DIM,
                                  mlp_dim=mlp_dim, num_encoder_layers=NUM_LAYERS,
                                  num_decoder_layers=NUM_LAYERS, dtype='float32')


def moe_config(num_experts: int, **kwargs) -> models.MoeConfig:
  base = dict(num_sparse_layers=NUM_SPARSE, sparse_layout='MIXED', extra_mlp=False, num_experts=num_experts,
              expert_mlp_dim=EXPERT_F, group_size=4096)
  if kwargs.get('moe_type') != 'lory':  # Lory merges experts: top-k and capacity settings are refused
    base.update(num_selected_experts=2, train_capacity_factor=2.5, eval_capacity_factor=4.0)
  base.update(kwargs)
  return models.MoeConfig(**base)


def build_model(name: str, args):
  e = args.num_experts
  config = transformer_config(EXPERT_F)
  if name == 'dense':  # (L − S)·F + 2F·S = L·F_dense
    return models.DecoderOnly(transformer_config(EXPERT_F * (NUM_LAYERS + NUM_SPARSE) // NUM_LAYERS), None)
  if name == 'switch_top1':
    return models.DecoderOnly(config, moe_config(e, num_selected_experts=1, expert_mlp_dim=2 * EXPERT_F,
                                                 train_capacity_factor=1.25, eval_capacity_factor=2.0))
  if name == 'st_moe_top2':
    return models.DecoderOnly(config, moe_config(e))
  if name == 'sparsemixer_v2':
    return models.DecoderOnly(config, moe_config(e, routing_method='sparsemixer', dropless=True))
  if name == 'rmoe':
    return models.DecoderOnly(config, moe_config(e, router='recurrent', recurrent_router_dim=128))
  if name == 'lory':
    return models.DecoderOnly(config, moe_config(e, moe_type='lory', expert_mlp_dim=2 * EXPERT_F,
                                                 segment_length=args.segment_length))
  if name == 'experts_choose':
    encoder = moe_config(e, routing_method='experts_choose', train_capacity_factor=2.0,
                         eval_capacity_factor=2.0)
    return models.EncoderDecoder(config, encoder_moe=encoder, decoder_moe=moe_config(e))
  raise ValueError(name)


# ---------------------------------------------------------------------------------------------------------
# Data: fetched once, so every model sees exactly the same batches.

def task_and_lengths(enc_dec: bool, length: int):
  if not enc_dec:
    return 'stdlib_lm', {'targets': length}
  from tasks import pretraining  # pylint: disable=g-import-not-at-top
  return 'stdlib_span_corruption', {'inputs': length,
                                    'targets': pretraining.span_corruption_lengths(length)[1]}


def fetch_batches(enc_dec: bool, args, split: str, count: int) -> list[dict[str, np.ndarray]]:
  task, lengths = task_and_lengths(enc_dec, args.length)
  train = split == 'train'
  cfg = data_lib.DatasetConfig(task, lengths, split=split, batch_size=args.batch, shuffle=train,
                               seed=args.seed, pack=True, num_epochs=None if train else 1)
  kind = data_lib.ENCODER_DECODER if enc_dec else data_lib.DECODER_ONLY
  iterator = data_lib.DataIterator(data_lib.get_dataset(cfg, kind, report_trimming=False))
  batches = []
  for batch in iterator:
    batches.append(data_lib.pad_batch(batch, args.batch))
    if len(batches) == count:
      break
  return batches


def batch_tokens(batch, enc_dec: bool) -> float:
  tokens = float(np.sum(batch['decoder_loss_weights']))
  if enc_dec:
    tokens += float(np.sum(batch['encoder_input_tokens'] > 0))
  return tokens


# ---------------------------------------------------------------------------------------------------------
# One training run.

def train_one(name: str, args, train_batches, eval_batches, mesh) -> dict:
  enc_dec = name in ENC_DEC
  model = build_model(name, args)
  schedule = optim.create_learning_rate_scheduler('constant * rsqrt_decay', args.learning_rate,
                                                  args.warmup_steps)
  kind = data_lib.ENCODER_DECODER if enc_dec else data_lib.DECODER_ONLY
  trainer = trainer_lib.Trainer(model, optim.adafactor, schedule, mesh, model_kind=kind, seed=args.seed)
  start = time.time()
  trainer.prepare(train_batches[0])
  state = trainer.init_state()
  params = int(sum(x.size for x in jax.tree.leaves(state.params)))

  def evaluate(step):
    results = trainer_lib.evaluate(trainer, state.params, iter(eval_batches), args.batch)
    bits = results['bits_per_token'] if enc_dec else results['bits_per_byte']
    curve.append({'step': step, 'bits': bits, 'loss': results['cross_ent_loss']})
    print(f'  {name:<15s} step {step:>5d}  validation {"bits/target token" if enc_dec else "bits/byte"} '
          f'{bits:.4f}  [{time.time() - start:.0f}s]', file=sys.stderr, flush=True)
    return results

  curve, train_metrics = [], []
  train_seconds, train_tokens, results, compile_s = 0.0, 0.0, None, None
  for step in range(1, args.steps + 1):
    batch = train_batches[(step - 1) % len(train_batches)]
    tic = time.time()
    state, metrics = trainer.train_step(state, batch)
    if step == 1:  # compilation: not counted in tokens/s
      jax.block_until_ready(state)
      compile_s = time.time() - tic
    else:
      train_seconds += time.time() - tic
      train_tokens += batch_tokens(batch, enc_dec)
    train_metrics.append({k: v for k, v in metrics.items()
                          if k in ('cross_ent_loss', 'experts/fraction_tokens_left_behind')})
    if step % args.eval_every == 0 or step == args.steps:
      tic = time.time()
      jax.block_until_ready(state)
      if step > 1:
        train_seconds += time.time() - tic  # the steps dispatched asynchronously finish here
      results = evaluate(step)
  train_metrics = jax.device_get(train_metrics)
  if not all(math.isfinite(float(m['cross_ent_loss'])) for m in train_metrics):
    print(f'WARNING: {name} had a non-finite training loss.', file=sys.stderr)
  dropped = [float(m['experts/fraction_tokens_left_behind']) for m in train_metrics
             if 'experts/fraction_tokens_left_behind' in m]
  return {
      'router': name, 'model': 'encoder_decoder' if enc_dec else 'decoder_only',
      'description': DESCRIPTIONS[name], 'params': params,
      'val_bits_per_byte': None if enc_dec else results['bits_per_byte'],
      'val_bits_per_target_token': results['bits_per_token'],
      'val_loss': results['cross_ent_loss'],
      'tokens_per_s': train_tokens / train_seconds if train_seconds > 0 else None,
      'dropped_train': float(np.mean(dropped)) if dropped else None,
      'dropped_eval': results.get('experts/fraction_tokens_left_behind'),
      'train_cross_ent': [float(m['cross_ent_loss']) for m in train_metrics],
      'curve': curve, 'compile_and_first_step_s': compile_s, 'wall_s': time.time() - start,
  }


# ---------------------------------------------------------------------------------------------------------
# Report.

def _fmt(value, spec, missing='–'):
  return missing if value is None else format(value, spec)


def markdown_table(rows: list[dict], baseline: float) -> str:
  dense = next((r['val_bits_per_byte'] for r in rows if r['router'] == 'dense'), None)
  lines = ['| router | model | val bits/byte | vs dense | tokens/s (train) | tokens dropped, train / eval '
           '| params |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    if r['val_bits_per_byte'] is None:
      bits = f'n/a¹ ({r["val_bits_per_target_token"]:.3f} bits/target token)'
      versus = 'n/a¹'
    else:
      bits = f'{r["val_bits_per_byte"]:.3f}'
      versus = '–' if dense is None or r['router'] == 'dense' else f'{r["val_bits_per_byte"] - dense:+.3f}'
    if r['router'] == 'dense':
      dropped = '– (no routing)'
    elif r['router'] == 'lory':
      dropped = '0 / 0 (no token routing)'
    else:
      dropped = f'{_fmt(r["dropped_train"], ".2%")} / {_fmt(r["dropped_eval"], ".2%")}'
    tokens = _fmt(r['tokens_per_s'], ',.0f') + ('²' if r['model'] == 'encoder_decoder' else '')
    model = 'enc-dec (span corr.)' if r['model'] == 'encoder_decoder' else 'decoder-only (LM)'
    lines.append(f'| {r["router"]} ({r["description"]}) | {model} | {bits} | {versus} | {tokens} | {dropped} '
                 f'| {r["params"] / 1e6:.2f}M |')
  lines.append('')
  lines.append(f'Unigram byte baseline on the same validation files: {baseline:.3f} bits/byte.')
  if any(r['model'] == 'encoder_decoder' for r in rows):
    lines.append('¹ The experts-choose model is an encoder-decoder trained on span corruption: its loss is per '
                 'span-corruption target token (15% of the bytes, predicted from both sides, plus sentinels), '
                 'not comparable with the decoder-only models\' bits per byte of every byte.')
    lines.append('² Encoder + decoder tokens per second.')
  return '\n'.join(lines)


def plot(rows: list[dict], baseline: float, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lm = [r for r in rows if r['model'] == 'decoder_only']
  encdec = [r for r in rows if r['model'] == 'encoder_decoder']
  fig, axes = plt.subplots(1, 2 if encdec else 1, figsize=(12 if encdec else 7, 4.5), squeeze=False)
  ax = axes[0][0]
  for r in lm:
    ax.plot([p['step'] for p in r['curve']], [p['bits'] for p in r['curve']], marker='o', markersize=3,
            label=r['router'])
  ax.axhline(baseline, color='gray', linestyle=':', label='unigram bytes')
  ax.set_xlabel('training step')
  ax.set_ylabel('validation bits per byte')
  ax.set_title('decoder-only LM on stdlib (equal activated compute)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if encdec:
    ax = axes[0][1]
    for r in encdec:
      ax.plot([p['step'] for p in r['curve']], [p['bits'] for p in r['curve']], marker='o', markersize=3,
              label=r['router'], color='tab:brown')
    ax.set_xlabel('training step')
    ax.set_ylabel('validation bits per target token')
    ax.set_title('encoder-decoder, span corruption (not comparable)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  command = 'python scripts/compare_routers.py ' + ' '.join(
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
  os.makedirs(args.out_dir, exist_ok=True)
  start = time.time()
  print(f'{len(args.routers)} models: {args.steps} steps of {args.batch}x{args.length} tokens each, eval every '
        f'{args.eval_every} steps on {args.eval_batches} validation batches; Lory segment length '
        f'{args.segment_length}; {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cores',
        file=sys.stderr, flush=True)
  mesh = partitioning.create_mesh(jax.devices()[:1])
  data = {}
  for enc_dec in sorted({name in ENC_DEC for name in args.routers}):
    data[enc_dec] = (fetch_batches(enc_dec, args, 'train', args.steps),
                     fetch_batches(enc_dec, args, 'validation', args.eval_batches))
  from tasks import pretraining  # pylint: disable=g-import-not-at-top
  baseline = pretraining.unigram_byte_baseline()
  rows = []
  for name in args.routers:
    train_batches, eval_batches = data[name in ENC_DEC]
    rows.append(train_one(name, args, train_batches, eval_batches, mesh))
  table = markdown_table(rows, baseline)
  settings = (f'{args.steps} steps × {args.batch} rows × {args.length} tokens per model '
              f'({args.steps * args.batch * args.length:,} token positions), Adafactor, rsqrt schedule '
              f'(base {args.learning_rate}, constant for the first {args.warmup_steps} steps), '
              f'{args.num_experts} experts, validation on {args.eval_batches} batches every '
              f'{args.eval_every} steps; {os.cpu_count()} CPU cores, jax {jax.__version__}; '
              f'total {(time.time() - start) / 60:.1f} min.')
  print(table)
  print(settings)
  with open(os.path.join(args.out_dir, 'router_comparison.md'), 'w') as f:
    f.write(f'# Router comparison\n\nMade with `{command}`\n\n{settings}\n\n{table}\n\n'
            f'![validation loss against steps](router_comparison.png)\n')
  with open(os.path.join(args.out_dir, 'router_comparison.json'), 'w') as f:
    json.dump({'command': command, 'args': vars(args), 'unigram_bits_per_byte': baseline, 'results': rows},
              f, indent=1)
  plot(rows, baseline, os.path.join(args.out_dir, 'router_comparison.png'))
  print(f'wrote {args.out_dir}/router_comparison.{{md,png,json}} in {(time.time() - start) / 60:.1f} min',
        file=sys.stderr)


if __name__ == '__main__':
  main()
