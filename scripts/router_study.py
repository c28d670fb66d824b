"""Router study: does a sparse model beat a dense one of equal activated compute, and which router is best?

Decoder-only byte-level language models on the embedded corpus (`stdlib_lm`), one per router and seed,
each trained by the project's own loop (trainer.fit: Adafactor, rsqrt schedule decaying linearly to zero,
z-losses, orbax checkpoints with the data position, TensorBoard event files), then evaluated on a fixed sample
of the validation split (its segments shuffled once with a fixed seed: the same batches for every run).

  dense               every FFN dense, width F (the FLOP-matched baseline)
  dense_total_params  every FFN dense and as wide as the MoE's total FFN parameters allow (upper reference)
  switch_top1         Switch: top-1 tokens-choose, experts of width F, capacity factor 1.25 (eval 2.0)
  st_moe_top2         ST-MoE: top-2 tokens-choose, experts of width F/2, capacity factor 2.5 (eval 4.0)
  st_moe_top2_renorm  the same with each token's two gates divided by their sum (GShard's top-2
                      gating; flaxformer's default, above, uses the raw softmax probabilities)
  sparsemixer_v2      GRIN's SparseMixer-v2 top-2 (arXiv:2409.12136), experts of width F/2, dropless
  rmoe                RMoE (arXiv:2408.06793): ST-MoE top-2 with a GRU router shared through depth
  lory                Lory (arXiv:2405.03133): segment-routed merging of experts of width F

Every sparse layer (every (L/S)-th layer, the MIXED layout) runs F columns of FFN per token for all routers
but dense_total_params, so activated compute is equal up to the routers. Capacity factors count token slots
over top-k assignments (docs/routing.md), so ST-MoE's 2.5 is 1.25 slots per assignment. Batch-prioritized
routing is not in the study: it ranks a group's tokens by their router scores, later tokens included, so a
decoder would see the future (models.check_causal_moe refuses it).

It resumes. Results go to OUT_DIR/results.json after every run (with the settings they were made with: a
rerun with other settings is refused), each run's checkpoints and event files to OUT_DIR/runs/<router>-seed<n>;
a killed study continues where it stopped, mid-run from the run's latest checkpoint. Several sittings can add
routers or seeds to the same study, one after another or side by side (the file is updated under a lock).

Wall-clock: training times on a shared host mean little, so the steps of every router in the study are also
timed side by side (round-robin, in one process, after training): "equal wall-clock" compares each router's
validation curve at the step where it has used as much time as the dense model's whole run.

Outputs (--report_dir, default OUT_DIR): router_study.md (table, settings, command; a hand-written section
from '## Findings' on is kept when it is written again), router_study.json,
router_study_validation.png (curves against steps and wall-clock), router_study_moe_metrics.png (expert usage,
tokens dropped, router z-loss, auxiliary loss and router confidence over training, from the event files).

  python scripts/router_study.py --routers dense,st_moe_top2,switch_top1 --seeds 0,1,2
  python scripts/router_study.py --routers sparsemixer_v2,rmoe,lory,dense_total_params --seeds 0
  python scripts/router_study.py --report_only --report_dir docs     # the report of the results so far
  python scripts/router_study.py --preset quick --out_dir /tmp/rs   # smoke test, about a minute
"""

import argparse
import dataclasses
import fcntl
import functools
import json
import math
import os
import shlex
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import st_moe_jax  # noqa: E402  (sets the TF log level before anything imports TensorFlow)

st_moe_jax.import_tensorflow_quietly()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from st_moe_jax import data as data_lib  # noqa: E402
from st_moe_jax import models  # noqa: E402
from st_moe_jax import optim  # noqa: E402
from st_moe_jax import partitioning  # noqa: E402
from st_moe_jax import summaries  # noqa: E402
from st_moe_jax import trainer as trainer_lib  # noqa: E402

ROUTERS = ('dense', 'dense_total_params', 'switch_top1', 'st_moe_top2', 'st_moe_top2_renorm', 'sparsemixer_v2',
           'rmoe', 'lory')
DESCRIPTIONS = {
    'dense': 'dense FFN, width F (FLOP-matched)',
    'dense_total_params': "dense FFN as wide as the MoE's total parameters",
    'switch_top1': 'Switch top-1, experts of width F, cf 1.25',
    'st_moe_top2': 'ST-MoE top-2, experts of width F/2, cf 2.5, no BPR (causal)',
    'st_moe_top2_renorm': 'ST-MoE top-2 with the two gates renormalised (GShard)',
    'sparsemixer_v2': 'SparseMixer-v2 top-2, width F/2, dropless',
    'rmoe': 'RMoE GRU router, top-2, width F/2, cf 2.5',
    'lory': 'Lory segment merging, experts of width F',
}
TRAINING_DATA = 'stdlib_lm, segments shuffled over the whole split'
VALIDATION_SEED = 0
VALIDATION_DATA = f'stdlib_lm validation, segments shuffled over the whole split (seed {VALIDATION_SEED})'
VOCAB = 384  # ByteVocabulary's 259 ids, rounded up to a multiple of 128 (st_moe_tiny)
FINDINGS = '## Findings'
SE_BLOCK_BATCHES = 16
MOE_CURVES = ('expert_usage', 'fraction_tokens_left_behind', 'router_z_loss', 'auxiliary_loss',
              'router_confidence')


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything that makes results comparable; a study's results.json holds one of these."""
  d_model: int
  num_heads: int
  head_dim: int
  num_layers: int
  num_sparse: int
  num_experts: int
  mlp_dim: int          # F: the dense FFN width, and the activated FFN width per token of every router
  steps: int
  batch: int
  length: int
  eval_every: int
  eval_batches: int     # validation batches per evaluation during training
  final_eval_batches: int
  learning_rate: float
  warmup_steps: int
  checkpoint_every: int
  segment_length: int   # Lory's T
  routing_groups: int   # routing groups per batch (MoeConfig.group_multiple): 1 = the whole batch, as one
                        # device's tokens are on a pod; flaxformer's default (G a multiple of E) would make
                        # every 128-token sequence its own group, where bursts of alike bytes overflow C
  expert_learning_rate_scale: float  # the experts' learning rate ÷ everyone else's (optim.scale_by_path) at step 0
  learning_rate_factors: str  # optim.create_learning_rate_scheduler's factors; a linear_decay reaches zero
                              # at the last step, so the final model is not pulled by its last few batches
  expert_learning_rate_scale_end: Optional[float] = None  # None: the experts' scale is constant; else it moves
                              # linearly from expert_learning_rate_scale at step 0 to this at the last step
                              # (the presets: 0.3 → 1, round 6 of docs/router_study.md; None is round 5's)
  training_data: str = TRAINING_DATA  # how the training stream is drawn: not a flag, a record (below)
  validation_data: str = VALIDATION_DATA  # how the validation batches are drawn: a record, as training_data


# What the training stream was when a results file was made; files from before this field existed were made
# with the older pipeline, which read the training files 64 at a time, so that a run shorter than an epoch saw
# a different part of the corpus per seed. Results of the two are not comparable.
LEGACY_TRAINING_DATA = 'stdlib_lm, 64 files read at a time'
# Likewise for validation: files from before `validation_data` read it in file order, so that the final
# evaluation's first 256 batches held a few dozen of the 84 files and neighbouring batches shared a file.
LEGACY_VALIDATION_DATA = 'stdlib_lm validation, in file order'
RECORDS = {'training_data': LEGACY_TRAINING_DATA, 'validation_data': LEGACY_VALIDATION_DATA}


PRESETS = {
    'study': StudyConfig(d_model=256, num_heads=4, head_dim=64, num_layers=4, num_sparse=2, num_experts=16,
                         mlp_dim=512, steps=1200, batch=16, length=128, eval_every=200, eval_batches=16,
                         final_eval_batches=256, learning_rate=1.0, warmup_steps=100, checkpoint_every=200,
                         segment_length=32, routing_groups=1, expert_learning_rate_scale=0.3,
                         expert_learning_rate_scale_end=1.0,
                         learning_rate_factors='rsqrt_decay * linear_decay'),
    'quick': StudyConfig(d_model=32, num_heads=2, head_dim=16, num_layers=2, num_sparse=1, num_experts=4,
                         mlp_dim=64, steps=8, batch=4, length=32, eval_every=4, eval_batches=2,
                         final_eval_batches=3, learning_rate=1.0, warmup_steps=2, checkpoint_every=4,
                         segment_length=8, routing_groups=1, expert_learning_rate_scale=0.3,
                         expert_learning_rate_scale_end=1.0,
                         learning_rate_factors='rsqrt_decay * linear_decay'),
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', choices=sorted(PRESETS), default='study')
  for field in dataclasses.fields(StudyConfig):
    if field.name in RECORDS:
      continue  # a record of the code, not a setting
    kind = float if field.type == Optional[float] else field.type
    parser.add_argument(f'--{field.name}', type=kind if kind in (int, float, str) else int,
                        default=None, help=f'override the preset\'s {field.name}')
  parser.add_argument('--routers', default='dense,st_moe_top2,switch_top1',
                      help=f'comma-separated, from {ROUTERS}')
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated seeds (init and data order)')
  parser.add_argument('--out_dir', default='runs/router_study')
  parser.add_argument('--report_dir', default=None, help='where the report goes (default: --out_dir)')
  parser.add_argument('--timing_rounds', type=int, default=5,
                      help='round-robin rounds of the side-by-side step timing (0: keep earlier timings)')
  parser.add_argument('--timing_steps', type=int, default=5, help='steps per router per timing round')
  parser.add_argument('--report_only', action='store_true',
                      help='write the report from the results so far (e.g. of a study still running); no training')
  args = parser.parse_args(argv)
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig)
               if getattr(args, f.name, None) is not None}
  args.config = dataclasses.replace(PRESETS[args.preset], **overrides)
  try:  # a bad schedule is refused before any run starts
    learning_rate_schedule(args.config)
  except ValueError as error:
    parser.error(f'--learning_rate_factors / --steps / --warmup_steps: {error}')
  args.routers = [r.strip() for r in args.routers.split(',') if r.strip()]
  unknown = [r for r in args.routers if r not in ROUTERS]
  if unknown:
    parser.error(f'unknown --routers {unknown}; choose from {ROUTERS}')
  try:
    args.seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  except ValueError:
    parser.error(f'--seeds must be comma-separated integers, got {args.seeds!r}')
  c = args.config
  if min(c.steps, c.batch, c.length, c.eval_every, c.eval_batches, c.final_eval_batches,
         c.checkpoint_every) < 1:
    parser.error('--steps, --batch, --length, --eval_every, --eval_batches, --final_eval_batches and '
                 '--checkpoint_every must be >= 1')
  if not c.expert_learning_rate_scale >= 0 or not (c.expert_learning_rate_scale_end or 0.0) >= 0:
    parser.error('--expert_learning_rate_scale and --expert_learning_rate_scale_end must be >= 0')
  if c.final_eval_batches < 2:
    parser.error('--final_eval_batches must be >= 2 (its standard error needs two batches)')
  if c.mlp_dim % 2:
    parser.error(f'--mlp_dim must be even (top-2 experts are F/2 wide), got {c.mlp_dim}')
  args.report_dir = args.report_dir or args.out_dir
  return args


# ---------------------------------------------------------------------------------------------------------
# Models of equal activated compute.

def dense_total_width(c: StudyConfig) -> int:
  """The per-layer dense FFN width with the ST-MoE model's total FFN parameters ((L−S)·F + S·E·F/2 over L
  layers), rounded to a multiple of 8."""
  total = (c.num_layers - c.num_sparse) * c.mlp_dim + c.num_sparse * c.num_experts * c.mlp_dim // 2
  return max(8, round(total / c.num_layers / 8) * 8)


def build_model(router: str, c: StudyConfig) -> models.DecoderOnly:
  def transformer(mlp_dim):
    return models.TransformerConfig(vocab_size=VOCAB, embed_dim=c.d_model, num_heads=c.num_heads,
                                    head_dim=c.head_dim, mlp_dim=mlp_dim, num_encoder_layers=c.num_layers,
                                    num_decoder_layers=c.num_layers, dtype='float32')

  def moe(**kwargs):
    base = dict(num_sparse_layers=c.num_sparse, sparse_layout='MIXED', num_experts=c.num_experts,
                group_size=c.batch * c.length, group_multiple=c.routing_groups)
    if kwargs.get('moe_type') != 'lory':  # Lory merges experts: it takes no top-k or capacity
      base.update(num_selected_experts=2, expert_mlp_dim=c.mlp_dim // 2, train_capacity_factor=2.5,
                  eval_capacity_factor=4.0)
    return models.MoeConfig(**{**base, **kwargs})

  variants = {
      'dense': lambda: (transformer(c.mlp_dim), None),
      'dense_total_params': lambda: (transformer(dense_total_width(c)), None),
      'switch_top1': lambda: (transformer(c.mlp_dim), moe(num_selected_experts=1, expert_mlp_dim=c.mlp_dim,
                                                          train_capacity_factor=1.25, eval_capacity_factor=2.0)),
      'st_moe_top2': lambda: (transformer(c.mlp_dim), moe()),
      'st_moe_top2_renorm': lambda: (transformer(c.mlp_dim), moe(renormalize_combine_weights=True)),
      'sparsemixer_v2': lambda: (transformer(c.mlp_dim), moe(routing_method='sparsemixer', dropless=True)),
      'rmoe': lambda: (transformer(c.mlp_dim), moe(router='recurrent', recurrent_router_dim=128)),
      'lory': lambda: (transformer(c.mlp_dim), moe(moe_type='lory', expert_mlp_dim=c.mlp_dim,
                                                   segment_length=c.segment_length)),
  }
  return models.DecoderOnly(*variants[router]())


def expert_scale_text(c: StudyConfig) -> str:
  if c.expert_learning_rate_scale_end is None:
    return f'{c.expert_learning_rate_scale}×'
  return (f'{c.expert_learning_rate_scale}× rising linearly to {c.expert_learning_rate_scale_end}× by the last '
          'step of')


def learning_rate_schedule(c: StudyConfig):
  decay = (optim.linear_decay_factor(c.steps, c.warmup_steps)
           if 'linear_decay' in c.learning_rate_factors else 0.0)
  return optim.create_learning_rate_scheduler(c.learning_rate_factors, c.learning_rate, c.warmup_steps,
                                              decay_factor=decay)


def expert_learning_rate_scale(c: StudyConfig):
  """The experts' factor on the learning rate: a float, or a linear schedule over the run."""
  if c.expert_learning_rate_scale_end is None:
    return c.expert_learning_rate_scale
  return optax.linear_schedule(c.expert_learning_rate_scale, c.expert_learning_rate_scale_end, c.steps)


def make_trainer(router: str, c: StudyConfig, seed: int, mesh) -> trainer_lib.Trainer:
  schedule = learning_rate_schedule(c)
  model = build_model(router, c)
  scales = ({optim.EXPERT_PARAM_PATTERN: expert_learning_rate_scale(c)}
            if model.moe is not None and (c.expert_learning_rate_scale, c.expert_learning_rate_scale_end) not in
            ((1.0, None), (1.0, 1.0)) else None)
  make_optimizer = functools.partial(optim.adafactor, learning_rate_scales=scales)
  return trainer_lib.Trainer(model, make_optimizer, schedule, mesh, model_kind=data_lib.DECODER_ONLY,
                             seed=seed)


def dataset_config(c: StudyConfig, split: str, seed: int) -> data_lib.DatasetConfig:
  """Both splits are a uniform sample of their segments, in the order `seed` gives; validation is read once
  (validation_batches fixes its seed)."""
  train = split == 'train'
  return data_lib.DatasetConfig('stdlib_lm', {'targets': c.length}, split=split, batch_size=c.batch,
                                shuffle=True, seed=seed, pack=True, num_epochs=None if train else 1)


def dataset(c: StudyConfig, split: str, seed: int):
  return data_lib.get_dataset(dataset_config(c, split, seed), data_lib.DECODER_ONLY, report_trimming=False)


def validation_batches(c: StudyConfig) -> data_lib.DataIterator:
  """The validation sample from its first batch: the same for every run (VALIDATION_SEED, whatever the run's
  seed) and for every evaluation of a run (data.evaluation_reader rebuilds the shuffled dataset)."""
  return data_lib.evaluation_reader(dataset_config(c, 'validation', VALIDATION_SEED), data_lib.DECODER_ONLY,
                                    report_trimming=False)()


# ---------------------------------------------------------------------------------------------------------
# The results file: one configuration, runs added as they finish.

def load_results(path: str, config: Optional[StudyConfig]) -> dict:
  """The results file at `path` (a new one if there is none), refused if it was made with settings other than
  `config`'s; config None (a report): whatever settings it holds."""
  if not os.path.exists(path):
    if config is None:
      raise SystemExit(f'error: no results at {path}: run the study first (or give its --out_dir).')
    return {'config': dataclasses.asdict(config), 'runs': {}, 'timing': None, 'commands': []}
  with open(path) as f:
    results = json.load(f)
  for field in dataclasses.fields(StudyConfig):  # a field added later: older files had its default (or, for
    if field.default is not dataclasses.MISSING:  # a record, RECORDS' value)
      results['config'].setdefault(field.name, RECORDS.get(field.name, field.default))
  if config is None:
    return results
  saved, current = results['config'], dataclasses.asdict(config)
  if saved != current:
    diff = ', '.join(f'{k}: {saved.get(k)} there, {current.get(k)} here'
                     for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k))
    raise SystemExit(
        f'error: {path} holds results made with other settings ({diff}); one study file holds one '
        'configuration: rerun with the same settings (--preset and overrides) or give another --out_dir.')
  return results


def update_results(path: str, config: StudyConfig, change) -> dict:
  """Reads the results file, applies change(results) and writes it back, holding a lock meanwhile: sittings
  side by side (one per router, say) add to one file without losing each other's additions."""
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    results = load_results(path, config)
    change(results)
    save_json(path, results)
  return results


def save_json(path: str, obj) -> None:
  tmp = f'{path}.{os.getpid()}.tmp'  # one per process: sittings side by side write the same report files
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)  # a study killed while writing keeps the previous file


# ---------------------------------------------------------------------------------------------------------
# One run: trainer.fit (resumes from the run's own checkpoints), then the final evaluation.

def run_dir(out_dir: str, router: str, seed: int) -> str:
  return os.path.join(out_dir, 'runs', f'{router}-seed{seed}')


def train_and_evaluate(router: str, seed: int, c: StudyConfig, out_dir: str, mesh) -> dict:
  model_dir = run_dir(out_dir, router, seed)
  trainer = make_trainer(router, c, seed, mesh)
  train_data = data_lib.DataIterator(dataset(c, 'train', seed))
  loop = trainer_lib.LoopConfig(c.steps, c.batch, log_period=max(1, min(c.eval_every // 4, 50)),
                                eval_period=c.eval_every, eval_steps=c.eval_batches,
                                checkpoint_period=c.checkpoint_every, keep=2)
  start = time.time()
  state = trainer_lib.fit(trainer, model_dir, train_data, loop,
                          eval_data=lambda: validation_batches(c), eval_name='validation',
                          print_fn=lambda line: print(f'  [{router} seed {seed}] {line}', file=sys.stderr,
                                                      flush=True))
  if state is None or int(state.step) < c.steps:
    return None  # preempted: the run's checkpoint holds where it stopped
  train_s = time.time() - start
  final = trainer_lib.evaluate(trainer, state.params, validation_batches(c), c.batch,
                               c.final_eval_batches, keep_batches=True)
  tb = summaries.read_scalars(os.path.join(model_dir, 'train'))
  curve = summaries.read_scalars(os.path.join(model_dir, 'training_eval', 'validation')).get(
      'bits_per_byte', ([], []))
  dropped = tb.get('experts/fraction_tokens_left_behind', ([], []))[1]
  return {
      'router': router, 'seed': seed,
      'params': int(sum(x.size for x in jax.tree.leaves(state.params))),
      'val_bits_per_byte': final['bits_per_byte'],
      'val_bits_per_byte_se': final['bits_per_byte_se'],
      'val_bytes': final['target_tokens'],
      'dropped_train': float(np.mean(dropped)) if dropped else None,
      'dropped_eval': final.get('experts/fraction_tokens_left_behind'),
      'router_z_loss_eval': final.get('experts/router_z_loss'),
      'curve': [[step, value] for step, value in zip(*curve)],
      'val_batches': final['batches'],  # [cross-entropy sum (nats), byte tokens] per batch: paired differences
      'last_sitting_train_s': train_s,
  }


# ---------------------------------------------------------------------------------------------------------
# Side-by-side step timing.

def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
  """The host's float32 matmul GFLOP/s (n×n×n), printed beside the timings: they move with the host."""
  a = jax.numpy.ones((n, n), jax.numpy.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  tic = time.perf_counter()
  for _ in range(repeats):
    f(a).block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - tic) / 1e9


def time_steps(routers: list[str], c: StudyConfig, mesh, rounds: int, steps: int) -> dict:
  """Median seconds per train step of each router, measured round-robin so that every router sees the same
  host load."""
  batches = data_lib.DataIterator(dataset(c, 'train', 0))
  batch_list = [next(batches) for _ in range(steps)]
  runs = {}
  for router in routers:
    trainer = make_trainer(router, c, 0, mesh)
    trainer.prepare(batch_list[0])
    state = trainer.init_state()
    state, _ = trainer.train_step(state, batch_list[0])  # compile
    jax.block_until_ready(state)
    runs[router] = [trainer, state, []]
  for _ in range(rounds):
    for router, run in runs.items():
      trainer, state, times = run
      tic = time.perf_counter()
      for batch in batch_list:
        state, _ = trainer.train_step(state, batch)
      jax.block_until_ready(state)
      times.append((time.perf_counter() - tic) / steps)
      run[1] = state
  return {'step_seconds': {r: float(np.median(run[2])) for r, run in runs.items()},
          'rounds': rounds, 'steps_per_round': steps, 'matmul_gflops': matmul_gflops(),
          'cpu_cores': os.cpu_count(), 'jax': jax.__version__}


# ---------------------------------------------------------------------------------------------------------
# Report.

def interpolate(curve: list, step: float) -> float:
  steps, values = zip(*curve)
  return float(np.interp(step, steps, values))


def summarize(results: dict) -> list[dict]:
  """Per router: mean ± std over seeds, the difference from dense with its standard error, equal
  wall-clock values."""
  c = StudyConfig(**results['config'])
  by_router = {}
  for run in results['runs'].values():
    by_router.setdefault(run['router'], []).append(run)
  timing = (results.get('timing') or {}).get('step_seconds', {})
  dense = by_router.get('dense', [])
  dense_values = np.array([r['val_bits_per_byte'] for r in dense])
  dense_runs = {r['seed']: r for r in dense}
  budget = c.steps * timing['dense'] if 'dense' in timing else None
  rows = []
  for router in ROUTERS:
    runs = sorted(by_router.get(router, []), key=lambda r: r['seed'])
    if not runs:
      continue
    values = np.array([r['val_bits_per_byte'] for r in runs])
    row = {'router': router, 'seeds': [r['seed'] for r in runs], 'mean': float(values.mean()),
           'std': float(values.std(ddof=1)) if len(values) > 1 else None,
           'eval_se': float(np.mean([eval_se(r) for r in runs])),
           'params': runs[0]['params'],
           'dropped_train': _mean([r['dropped_train'] for r in runs]),
           'dropped_eval': _mean([r['dropped_eval'] for r in runs]),
           'step_s': timing.get(router)}
    if router != 'dense' and len(dense_values):
      row['delta'] = float(values.mean() - dense_values.mean())
      if len(values) > 1 and len(dense_values) > 1:
        row['delta_se'] = float(math.sqrt(values.var(ddof=1) / len(values)
                                          + dense_values.var(ddof=1) / len(dense_values)))
      # A seed fixes the data order (and the init of the parameters both models share), so the same-seed
      # difference removes what the two runs have in common.
      paired = np.array([r['val_bits_per_byte'] - dense_runs[r['seed']]['val_bits_per_byte'] for r in runs
                         if r['seed'] in dense_runs])
      if len(paired):  # with one seed, the same-seed difference is still the fairer single number
        row['paired_delta'] = float(paired.mean())
        row['paired_seeds'] = len(paired)
      # Per seed, the two runs' final evaluations compared batch by batch (same batches): is each seed's
      # difference beyond the noise of the evaluation? Its spread over seeds is then the training's noise.
      recorded = [r for r in runs if r.get('val_batches') and dense_runs.get(r['seed'], {}).get('val_batches')]
      row['seed_deltas'] = [
          [r['seed'], *trainer_lib.paired_difference(r['val_batches'], dense_runs[r['seed']]['val_batches'],
                                                     block=se_block(len(r['val_batches'])))]
          for r in recorded]
      if len(paired) > 1:
        # The spread over seeds is the training's noise (with each seed's share of the evaluation's). Every seed
        # reads the same validation batches, so which batches they are is noise that averaging over seeds does
        # not remove: the mean difference's own evaluation SE is added (in quadrature, so conservatively).
        row['paired_se'] = mean_and_se(paired)[1]
        row['paired_eval_se'] = 0.0
        if len(recorded) == len(paired):
          mean_batches = lambda runs_: np.mean([run['val_batches'] for run in runs_], axis=0)
          row['paired_eval_se'] = trainer_lib.paired_difference(
              mean_batches(recorded), mean_batches([dense_runs[r['seed']] for r in recorded]),
              block=se_block(len(recorded[0]['val_batches'])))[1]
        row['paired_total_se'] = float(math.hypot(row['paired_se'], row['paired_eval_se']))
    if budget and router in timing and all(r['curve'] for r in runs):
      at = budget / timing[router]  # the step where this router has used the dense run's time
      row['equal_time_step'] = min(at, c.steps)
      row['equal_time_capped'] = at > c.steps
      row['equal_time_bits'] = float(np.mean([interpolate(r['curve'], min(at, c.steps)) for r in runs]))
    rows.append(row)
  return rows


def training_gaps(results: dict, out_dir: str) -> dict:
  """{router: {seed: [[last step of the bin, gap], ...]}}: the router's training cross-entropy minus dense's at
  the same seed, in nats per token, averaged over bins of eval_every steps, from the event files. Each batch
  is scored before the update that uses it, and both runs read the same batches, so this is a held-out,
  paired difference over every training token: how the gap moves through training."""
  c = StudyConfig(**results['config'])
  dense_seeds = {r['seed'] for r in results['runs'].values() if r['router'] == 'dense'}

  @functools.cache  # a dense run is read once, whatever the number of routers paired with it
  def cross_entropy(router: str, seed: int) -> dict:
    return dict(zip(*summaries.read_scalars(os.path.join(run_dir(out_dir, router, seed), 'train')).get(
        'cross_ent_loss', ([], []))))

  gaps = {}
  for run in results['runs'].values():
    router, seed = run['router'], run['seed']
    if router == 'dense' or seed not in dense_seeds:
      continue
    routed, dense = cross_entropy(router, seed), cross_entropy('dense', seed)
    bins = {}
    for step in sorted(set(routed) & set(dense)):
      bins.setdefault((step - 1) // c.eval_every, []).append(routed[step] - dense[step])
    if bins:
      gaps.setdefault(router, {})[seed] = [[min((b + 1) * c.eval_every, c.steps), float(np.mean(v))]
                                           for b, v in sorted(bins.items())]
  return gaps


def mean_and_se(values) -> tuple[float, float | None]:
  """The mean over seeds and its standard error, the seeds' spread (std with ddof=1) over sqrt(n); no SE for
  one seed."""
  values = np.asarray(values, dtype=float)
  se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
  return float(values.mean()), se


def gaps_over_seeds(gaps: dict) -> dict:
  """{router: [[last step of the bin, mean gap, its SE, seeds], ...]} over the seeds training_gaps holds,
  for routers with more than one seed: the seeds' spread is the noise a bin's gap carries."""
  summary = {}
  for router, by_seed in gaps.items():
    if len(by_seed) < 2:
      continue
    by_end = {}
    for bins in by_seed.values():
      for end, gap in bins:
        by_end.setdefault(end, []).append(gap)
    summary[router] = [[end, *mean_and_se(values), len(values)] for end, values in sorted(by_end.items())]
  return summary


def gaps_table(gaps: dict, over_seeds: dict) -> str:
  """training_gaps per seed, and gaps_over_seeds' mean ± SE row per router, as a markdown table."""
  if not gaps:
    return ''
  ends = sorted({end for by_seed in gaps.values() for bins in by_seed.values() for end, _ in bins})
  lines = ['| router | seed | ' + ' | '.join(f'to step {end}' for end in ends) + ' |',
           '|---|---|' + '---|' * len(ends)]
  for router in ROUTERS:
    for seed, bins in sorted(gaps.get(router, {}).items()):
      by_end = dict(bins)
      lines.append(f'| {router} | {seed} | ' + ' | '.join(_fmt(by_end.get(end), '+.4f') for end in ends) + ' |')
    if router in over_seeds:
      by_end = {end: f'{mean:+.4f} ± {se:.4f}' for end, mean, se, _ in over_seeds[router] if se is not None}
      cells = [by_end.get(end, '–') for end in ends]
      lines.append(f'| {router} | mean ± SE ({len(gaps[router])} seeds) | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def se_block(num_batches: int) -> int:
  """Batches per observation of an evaluation SE. Read in file order, neighbouring batches shared a file, and
  blocks of 16 batches (32 KB at the study's size, about a file) gave SEs 2× the per-batch ones (round 4).
  In the shuffled sample a 4 KB segment still fills about two batches and seqio's shuffle buffer mixes only
  about 30 segments: blocks of 16 give 1.0–1.4× the per-batch SE (round 5), kept as the cautious choice."""
  return max(1, min(SE_BLOCK_BATCHES, num_batches // 2))


def eval_se(run: dict) -> float:
  """A run's final-evaluation SE: from blocks of batches (se_block) where its batches are recorded, else the
  per-batch SE the trainer reported."""
  if not run.get('val_batches'):
    return run['val_bits_per_byte_se']
  block = se_block(len(run['val_batches']))
  return trainer_lib.ratio_standard_error(run['val_batches'], block) / math.log(2)


def _mean(values):
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _fmt(value, spec, missing='–'):
  return missing if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
  lines = ['| router | seeds | params | val bits/byte, mean ± std | vs dense ± SE | same-seed pairs ± SE | '
           'beyond noise? | per seed, batch by batch (z) | '
           'eval SE per run | step time (× dense) | bits/byte at equal wall-clock | tokens dropped, train / eval |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  dense_step = next((r['step_s'] for r in rows if r['router'] == 'dense'), None)
  z = lambda delta, se: abs(delta) / se if se > 0 else math.inf
  for r in rows:
    spread = f'{r["mean"]:.4f} ± {r["std"]:.4f}' if r['std'] is not None else f'{r["mean"]:.4f} (one seed)'
    paired = '–'
    if 'paired_se' in r:
      paired = (f'{r["paired_delta"]:+.4f} ± {r["paired_total_se"]:.4f} ({r["paired_seeds"]} seeds; '
                f'{r["paired_se"]:.4f} over seeds, {r["paired_eval_se"]:.4f} evaluation)')
    elif 'paired_delta' in r:
      paired = f'{r["paired_delta"]:+.4f} (seed {r["seeds"][0]})'
    if r['router'] == 'dense':
      versus, verdict = '–', '–'
    elif 'delta_se' in r:
      versus = f'{r["delta"]:+.4f} ± {r["delta_se"]:.4f}'
      # The same-seed difference decides where there is one: pairing removes the noise of the data order the
      # two runs share, which the unpaired SE counts in full.
      delta, se = ((r['paired_delta'], r['paired_total_se']) if 'paired_total_se' in r
                   else (r['delta'], r['delta_se']))
      shown = (f'paired {z(delta, se):.1f} SE, unpaired {z(r["delta"], r["delta_se"]):.1f}'
               if 'paired_total_se' in r else f'unpaired {z(delta, se):.1f} SE')
      verdict = (f'yes, {"better" if delta < 0 else "worse"} ({shown})' if z(delta, se) > 3
                 else f'no ({shown})')
    elif 'delta' in r:
      versus, verdict = f'{r["delta"]:+.4f}', 'n/a (one seed)'
    else:
      versus, verdict = '–', '–'
    step = (f'{r["step_s"] * 1e3:.0f} ms ({r["step_s"] / dense_step:.2f}×)' if r['step_s'] and dense_step
            else _fmt(r['step_s'], '.3f'))
    equal = '–'
    if 'equal_time_bits' in r:
      equal = f'{r["equal_time_bits"]:.4f} (step {r["equal_time_step"]:.0f}{", all steps" if r["equal_time_capped"] else ""})'
    dropped = ('–' if r['router'] in ('dense', 'dense_total_params') else
               '0 (no token routing)' if r['router'] == 'lory' else
               f'{_fmt(r["dropped_train"], ".2%")} / {_fmt(r["dropped_eval"], ".2%")}')
    per_seed = ', '.join(f'{d:+.4f} ({d / se:+.1f})' for _, d, se in r.get('seed_deltas', [])) or '–'
    lines.append(f'| {r["router"]} ({DESCRIPTIONS[r["router"]]}) | {len(r["seeds"])} | {r["params"] / 1e6:.2f}M '
                 f'| {spread} | {versus} | {paired} | {verdict} | {per_seed} | {r["eval_se"]:.4f} | {step} | {equal} '
                 f'| {dropped} |')
  return '\n'.join(lines)


def plot_validation(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  timing = (results.get('timing') or {}).get('step_seconds', {})
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for router in ROUTERS:
    runs = [r for r in results['runs'].values() if r['router'] == router and r['curve']]
    if not runs:
      continue
    steps = np.array([s for s, _ in runs[0]['curve']])
    values = np.array([[interpolate(r['curve'], s) for s in steps] for r in runs])
    mean = values.mean(0)
    for ax, scale in ((axes[0], 1.0), (axes[1], timing.get(router))):
      if scale is None:
        continue
      line, = ax.plot(steps * scale, mean, marker='o', markersize=3, label=f'{router} ({len(runs)} seeds)')
      if len(runs) > 1:
        ax.fill_between(steps * scale, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
  axes[0].set_xlabel('training step')
  axes[1].set_xlabel('estimated training seconds (steps × side-by-side step time)')
  for ax in axes:
    ax.set_ylabel('validation bits per byte')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_title('equal tokens (band: min–max over seeds)')
  axes[1].set_title('equal wall-clock')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_moe_metrics(results: dict, out_dir: str, path: str) -> None:
  """The MoE metrics the trainer logs (TensorBoard, mean over the MoE layers), seed 0 of each router."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(MOE_CURVES), figsize=(4 * len(MOE_CURVES), 3.8))
  for router in ROUTERS:
    seeds = sorted(r['seed'] for r in results['runs'].values() if r['router'] == router)
    if not seeds or router.startswith('dense'):
      continue
    tags = summaries.read_scalars(os.path.join(run_dir(out_dir, router, seeds[0]), 'train'))
    for ax, name in zip(axes, MOE_CURVES):
      steps, values = tags.get(f'experts/{name}', ([], []))
      if steps:
        ax.plot(steps, values, label=router)
  for ax, name in zip(axes, MOE_CURVES):
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(results: dict, args) -> str:
  c = StudyConfig(**results['config'])
  rows = summarize(results)
  table = markdown_table(rows)
  timing = results.get('timing')
  tokens = c.steps * c.batch * c.length
  settings = (
      f'Model: decoder-only, d_model {c.d_model}, {c.num_heads} heads of {c.head_dim}, {c.num_layers} layers '
      f'of which {c.num_sparse} sparse (MIXED), {c.num_experts} experts, F = {c.mlp_dim} (dense_total_params: '
      f'{dense_total_width(c)}), GEGLU, float32, byte vocabulary. Training: {c.steps} steps × {c.batch} rows × '
      f'{c.length} tokens ({tokens:,} token positions per run; training data: {c.training_data}), Adafactor, learning rate '
      f'\'{c.learning_rate_factors}\' (base {c.learning_rate}, warm-up {c.warmup_steps} steps'
      f'{", then to zero at the last step" if "linear_decay" in c.learning_rate_factors else ""}), experts at '
      f'{expert_scale_text(c)} that rate, {c.routing_groups} routing group(s) per batch, aux loss '
      f'0.01, router z-loss 1e-3. '
      f'Final validation: the first {c.final_eval_batches} batches of {c.validation_data} '
      f'({c.final_eval_batches * c.batch * c.length:,} token positions, the same for every run); during training '
      f'{c.eval_batches} batches every {c.eval_every} steps.')
  if timing:
    settings += (f' Step times: median of {timing["rounds"]} round-robin rounds of {timing["steps_per_round"]} '
                 f'steps per router, in one process, on {timing["cpu_cores"]} CPU cores (host float32 matmul: '
                 f'{timing["matmul_gflops"]:.0f} GFLOP/s), jax {timing["jax"]}.')
  notes = ('"vs dense ± SE": difference of the seed means, SE = sqrt(s²/n + s_dense²/n_dense) over seeds. '
           '"same-seed pairs": the mean over seeds of (router − dense at the same seed), with its SE: the SE over '
           'seeds and the mean difference\'s own evaluation SE (every seed reads the same batches, so that part '
           'does not average out over seeds), added in quadrature. A seed fixes the data order and the init of '
           'the parameters both models share, so pairing removes the noise the two runs share. "beyond noise?": '
           '|same-seed difference| > 3 of its SE (where a router has no seed in common with dense: the unpaired '
           'difference); the unpaired z is shown beside it. "per seed, batch by batch": each seed\'s '
           'difference from dense, its final evaluation compared with dense\'s batch by batch (the same batches), '
           'with z = difference / its SE. "eval SE per run": the standard error of one run\'s final validation '
           'value from the batches it read (ratio estimator). Evaluation SEs count blocks of 16 consecutive '
           'batches as one observation (neighbouring batches share segments; read in file order, they shared '
           'files), where the runs recorded their batches. "equal wall-clock": the '
           'validation curve read (linear interpolation between evaluations) at the step where the router has '
           'used the dense run\'s time, by the side-by-side step times.')
  commands = '\n'.join(f'    {cmd}' for cmd in results['commands'])
  gaps = training_gaps(results, args.out_dir)
  gaps_summary = gaps_over_seeds(gaps)
  gaps_md = (f'Training cross-entropy, router − dense at the same seed (nats per token, mean over each '
             f'{c.eval_every}-step bin; the same batches, each scored before its update):\n\n'
             f'{gaps_table(gaps, gaps_summary)}\n\n' if gaps else '')
  md = (f'# Router study\n\nMade with (in sittings that append to one results file):\n\n{commands}\n\n'
        f'{settings}\n\n{table}\n\n{notes}\n\n{gaps_md}![validation](router_study_validation.png)\n\n'
        f'![MoE metrics over training](router_study_moe_metrics.png)\n')
  os.makedirs(args.report_dir, exist_ok=True)
  path = os.path.join(args.report_dir, 'router_study.md')
  if os.path.exists(path):  # a hand-written '## Findings' section survives regeneration
    with open(path) as f:
      previous = f.read()
    if FINDINGS in previous:
      md += '\n' + previous[previous.index(FINDINGS):]
  with open(path, 'w') as f:
    f.write(md)
  save_json(os.path.join(args.report_dir, 'router_study.json'),
            {**results, 'summary': rows, 'training_gaps': gaps,
             'training_gaps_over_seeds': gaps_summary})
  plot_validation(results, os.path.join(args.report_dir, 'router_study_validation.png'))
  plot_moe_metrics(results, args.out_dir, os.path.join(args.report_dir, 'router_study_moe_metrics.png'))
  return table


def main(argv=None):
  args = parse_args(argv)
  c = args.config
  os.makedirs(args.out_dir, exist_ok=True)
  results_path = os.path.join(args.out_dir, 'results.json')
  if args.report_only:
    print(write_report(load_results(results_path, None), args))
    return
  command = 'python scripts/router_study.py ' + ' '.join(
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

  def add_command(results):
    if command not in results['commands']:
      results['commands'].append(command)

  results = update_results(results_path, c, add_command)
  mesh = partitioning.create_mesh(jax.devices()[:1])
  todo = [(r, s) for s in args.seeds for r in args.routers if f'{r}/seed{s}' not in results['runs']]
  print(f'router study in {args.out_dir}: {len(todo)} runs to do ({len(results["runs"])} done)',
        file=sys.stderr, flush=True)
  for router, seed in todo:
    tic = time.time()
    run = train_and_evaluate(router, seed, c, args.out_dir, mesh)
    if run is None:
      print('Stopped (SIGTERM); rerun the same command to continue.', file=sys.stderr)
      return
    results = update_results(results_path, c,
                             lambda results: results['runs'].update({f'{router}/seed{seed}': run}))
    print(f'{router} seed {seed}: validation {run["val_bits_per_byte"]:.4f} ± {run["val_bits_per_byte_se"]:.4f} '
          f'bits/byte [{time.time() - tic:.0f}s]', file=sys.stderr, flush=True)
  studied = [r for r in ROUTERS if any(run['router'] == r for run in results['runs'].values())]
  timed = set((results.get('timing') or {}).get('step_seconds', {}))
  if args.timing_rounds and studied and (todo or timed != set(studied)):
    print(f'timing {len(studied)} routers side by side...', file=sys.stderr, flush=True)
    timing = time_steps(studied, c, mesh, args.timing_rounds, args.timing_steps)
    results = update_results(results_path, c, lambda results: results.update(timing=timing))
  print(write_report(results, args))
  print(f'wrote {args.report_dir}/router_study.{{md,json}} and the plots', file=sys.stderr)


if __name__ == '__main__':
  main()
