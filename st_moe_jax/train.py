r"""Training entry point, t5x style:

  python -m st_moe_jax.train --gin_file=gin/runs/pretrain.gin --gin_file=gin/models/st_moe_tiny.gin \
      --gin.MODEL_DIR="'runs/demo'" --gin.TRAIN_STEPS=1000 \
      --gin.MIXTURE_OR_TASK_NAME="'stdlib_span_corruption'" \
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 256, 'targets': 64}"

Flags: --gin_file (repeatable; later files override earlier ones), --gin_bindings (repeatable),
--gin.NAME=VALUE (rewritten to --gin_bindings=NAME=VALUE), --gin_search_paths (comma-separated, default
'.'), --tfds_data_dir, and for multi-host --coordinator_address --process_count --process_index (or the
environment variables JAX_COORDINATOR_ADDRESS / JAX_PROCESS_COUNT / JAX_PROCESS_INDEX).

This module also holds what the three entry points share: flag parsing, gin registrations and parsing,
the mesh, and turning bad input into a clear message (exit status 2) instead of a stack trace.
"""

import argparse
import dataclasses
import difflib
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

import gin

from st_moe_jax import checkpoint_manager as ckpt_lib
from st_moe_jax import data as data_lib
from st_moe_jax import gin_setup
from st_moe_jax import lory as lory_lib
from st_moe_jax import models
from st_moe_jax import optim
from st_moe_jax import partitioning
from st_moe_jax import trainer as trainer_lib

# ---------------------------------------------------------------------------------------------------------
# Gin registrations used by gin/runs/*.gin (t5x-like names).

# Registered only in the importable module: `python -m st_moe_jax.train` delegates to it (see the bottom),
# so the gin files' `import st_moe_jax.train` never registers a second copy from __main__.
if __name__ != '__main__':
  gin.external_configurable(data_lib.DatasetConfig, 'utils.DatasetConfig')
  gin.external_configurable(optim.create_learning_rate_scheduler, 'utils.create_learning_rate_scheduler')
  gin.external_configurable(optim.adafactor, 'optim.adafactor')


class UserError(Exception):
  """Bad input from the command line or gin; the entry point prints the message and exits with 2."""


# ---------------------------------------------------------------------------------------------------------
# Flags and gin.

def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """--gin.NAME=VALUE → --gin_bindings=NAME=VALUE (t5x's gin_utils.rewrite_gin_args)."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.'):].partition('=')
      if not sep:
        raise UserError(f'{arg}: expected --gin.NAME=VALUE.')
      arg = f'--gin_bindings={name} = {value}'
    out.append(arg)
  return out


def parse_flags(argv: Sequence[str], description: str) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--gin_file', action='append', default=[], help='gin file (repeatable)')
  parser.add_argument('--gin_bindings', action='append', default=[], help='gin binding (repeatable)')
  parser.add_argument('--gin_search_paths', default='.', help='comma-separated folders for gin files')
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--coordinator_address', default=os.environ.get('JAX_COORDINATOR_ADDRESS'))
  parser.add_argument('--process_count', type=int, default=_env_int('JAX_PROCESS_COUNT'))
  parser.add_argument('--process_index', type=int, default=_env_int('JAX_PROCESS_INDEX'))
  parser.add_argument('--multiprocess_gpu', action='store_true', help='accepted for t5x compatibility')
  parser.add_argument('--alsologtostderr', action='store_true', help='accepted for t5x compatibility')
  return parser.parse_args(rewrite_gin_args(argv))


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value else None


def init_distributed(flags: argparse.Namespace) -> None:
  """jax.distributed.initialize when a coordinator is given (multi-host); a no-op otherwise."""
  if not flags.coordinator_address:
    return
  import jax  # pylint: disable=g-import-not-at-top
  if flags.process_count is None or flags.process_index is None:
    raise UserError('--coordinator_address needs --process_count and --process_index (or JAX_PROCESS_COUNT '
                    'and JAX_PROCESS_INDEX).')
  jax.distributed.initialize(flags.coordinator_address, flags.process_count, flags.process_index)


def _referenced_macros() -> set[str]:
  """Macro names some binding refers to (%NAME), after parsing."""
  found = set()

  def visit(value):
    if isinstance(value, gin.config.ConfigurableReference):
      if value.selector == 'gin.macro':
        found.add(value.scoped_selector.rsplit('/', 1)[0])
    elif isinstance(value, dict):
      for v in value.values():
        visit(v)
    elif isinstance(value, (list, tuple)):
      for v in value:
        visit(v)

  for bindings in gin.config._CONFIG.values():
    visit(bindings)
  return found


def _defined_macros() -> set[str]:
  return {scope for (scope, selector) in gin.config._CONFIG if selector == 'gin.macro'}


def check_macro_names(bindings: Sequence[str]) -> None:
  """A --gin.NAME for an all-caps NAME that no gin file defines or uses is a misspelt macro."""
  known = _referenced_macros() | _defined_macros_from_files()
  for binding in bindings:
    name = binding.split('=', 1)[0].strip()
    if name.isupper() and '.' not in name and '/' not in name and name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=3)
      hint = f' Did you mean {", ".join(close)}?' if close else ''
      raise UserError(f'Unknown gin macro {name!r} in --gin.{name} / --gin_bindings: no gin file defines or '
                      f'uses it, so it would be silently ignored.{hint}')


_FILE_MACROS: set[str] = set()


def _defined_macros_from_files() -> set[str]:
  return _FILE_MACROS


def parse_gin(flags: argparse.Namespace) -> None:
  """Parses --gin_file files then --gin_bindings; gin's own message (with the file and line) on error."""
  gin.clear_config()
  for path in flags.gin_search_paths.split(','):
    if path:
      gin.add_config_file_search_path(path)
  files = [_resolve(f, flags.gin_search_paths) for f in flags.gin_file]
  if not files:
    raise UserError('No --gin_file given: pass a run config (gin/runs/pretrain.gin, ...) and a model '
                    '(gin/models/st_moe_tiny.gin, ...).')
  try:
    gin.parse_config_files_and_bindings(files, [], finalize_config=False)
    _FILE_MACROS.clear()
    _FILE_MACROS.update(_defined_macros())
    gin.parse_config_files_and_bindings([], flags.gin_bindings, finalize_config=False)
  except (ValueError, IOError, SyntaxError, ImportError) as e:
    raise UserError(f'gin could not parse the configuration: {e}') from None
  check_macro_names(flags.gin_bindings)


def _resolve(path: str, search_paths: str) -> str:
  """A relative --gin_file is looked up under each --gin_search_paths folder (first hit wins)."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  for root in search_paths.split(','):
    candidate = os.path.join(root, path)
    if os.path.exists(candidate):
      return candidate
  raise UserError(f'gin file {path!r} not found (searched {search_paths!r}; set --gin_search_paths).')


def run_main(main: Callable[[argparse.Namespace], Any], description: str,
             argv: Optional[Sequence[str]] = None) -> None:
  """Parses flags and gin, runs `main`, and prints bad-input errors without a stack trace (exit 2)."""
  from tasks import common  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.ERROR)
  try:
    flags = parse_flags(sys.argv[1:] if argv is None else argv, description)
    if flags.tfds_data_dir:
      os.environ['TFDS_DATA_DIR'] = flags.tfds_data_dir
    init_distributed(flags)
    parse_gin(flags)
    main(flags)
  except (UserError, common.TaskInputError, ckpt_lib.CheckpointShapeError,
          trainer_lib.TrainingDivergedError) as e:
    # gin appends "In call to configurable ..." lines; the message itself says what to change.
    message = '\n'.join(line for line in str(e).splitlines()
                        if not line.strip().startswith('In call to configurable'))
    print(f'ERROR: {message}', file=sys.stderr)
    sys.exit(2)


def call_configurable(fn: Callable[[], Any], name: str) -> Any:
  """Calls a gin configurable, turning missing REQUIRED macros and bad parameters into UserError."""
  try:
    return fn()
  except (ValueError, TypeError) as e:
    message = str(e)
    if 'Required bindings' in message or 'gin.REQUIRED' in message or 'REQUIRED' in message:
      raise UserError(f'{name}: a required macro is not set ({_first_line(message)}). Set it with '
                      f'--gin.MACRO=value; the REQUIRED macros are listed at the top of the run gin file '
                      f'(e.g. --gin.MODEL_DIR="\'runs/demo\'").') from None
    raise


def _first_line(message: str) -> str:
  return message.strip().splitlines()[0]


def required(value: Any, macro: str, example: str) -> Any:
  if value is None or value is gin.REQUIRED:
    raise UserError(f'{macro} is required: pass --gin.{macro}={example}.')
  return value


def create_mesh(num_expert_partitions: int, num_model_partitions: int, model: Any):
  """The mesh, after checking NUM_EXPERTS divides evenly over the expert partitions."""
  num_experts = gin_setup.macro('NUM_EXPERTS')
  try:
    mesh = partitioning.create_mesh(num_expert_partitions=num_expert_partitions,
                                    num_model_partitions=num_model_partitions)
    if num_experts and _has_moe(model):
      partitioning.check_num_experts(num_experts, num_expert_partitions, mesh)
  except ValueError as e:
    raise UserError(str(e)) from None
  return mesh


def _has_moe(model: Any) -> bool:
  moes = [getattr(model, n, None) for n in ('encoder_moe', 'decoder_moe', 'moe')]
  return any(m is not None and m.num_sparse_layers > 0 for m in moes)


def check_batch(batch_size: int, mesh) -> None:
  try:
    partitioning.check_batch_size(batch_size, mesh)
  except ValueError as e:
    raise UserError(str(e)) from None


def write_model_info(model_dir: str, trainer: trainer_lib.Trainer) -> None:
  """MODEL_DIR/model-info.txt: every parameter's shape, logical axes and sharding."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  shapes = ckpt_lib.flat_paths(trainer.abstract_params)
  axes = ckpt_lib.flat_paths(trainer.logical_axes)
  with open(os.path.join(model_dir, 'model-info.txt'), 'w') as f:
    f.write(f'mesh {dict(trainer.mesh.shape)}\n')
    total = 0
    for path, leaf in shapes.items():
      total += int(leaf.size)
      f.write(f'{path}  {tuple(leaf.shape)}  axes={tuple(axes.get(path, ()))}  '
              f'sharding={leaf.sharding.spec}\n')
    f.write(f'total parameters {total:,}\n')


# ---------------------------------------------------------------------------------------------------------
# Lory's dense warm-up (seed_methods.md §3.3): train the dense model for the first W steps, then copy its
# FFN into every expert, draw a random router, and train the Lory model from step W on.

@dataclasses.dataclass(frozen=True)
class DenseWarmup:
  """The dense half of a Lory run.

  Attributes:
    dense_model: the Lory model with dense FFNs where its Lory layers are (same parameters otherwise).
    steps: W (`lory.dense_warmup_steps`).
    layer_indices: the decoder layers that are Lory layers.
    num_experts: E.
  """
  dense_model: Any
  steps: int
  layer_indices: tuple[int, ...]
  num_experts: int


def lory_dense_warmup(model: Any, fraction: float, train_steps: int) -> Optional[DenseWarmup]:
  """The warm-up plan for LORY_DENSE_WARMUP_FRACTION, or None for fraction 0.

  Raises:
    UserError: a fraction outside [0, 1) or one that leaves no Lory step, a model without Lory layers,
      or Lory experts that a dense FFN cannot fill (other width or activations, or ST-MoE's extra FFN).
  """
  try:
    steps = lory_lib.dense_warmup_steps(fraction, train_steps)
  except ValueError as e:
    raise UserError(str(e)) from None
  if not steps:
    return None
  field = {models.DecoderOnly: 'moe', models.EncoderDecoder: 'decoder_moe'}.get(type(model))
  moe = getattr(model, field) if field else None
  if moe is None or moe.moe_type != 'lory' or not moe.num_sparse_layers:
    raise UserError(f'LORY_DENSE_WARMUP_FRACTION={fraction} warms up a Lory model, but this model has no Lory '
                    f'layers; include gin/routers/lory.gin (after the model file and gin/runs/decoder_only.gin), '
                    f'or drop gin/runs/lory_warmup.gin.')
  cfg = model.config
  if (moe.expert_mlp_dim not in (None, cfg.mlp_dim) or moe.expert_activations not in (None, cfg.activations)
      or moe.extra_mlp):
    raise UserError(f'The dense warm-up copies the dense FFN into every Lory expert, so the experts must be '
                    f'that FFN: set EXPERT_MLP_DIM = MLP_DIM (got {moe.expert_mlp_dim} vs {cfg.mlp_dim}), the '
                    f'same activations, and EXTRA_MLP = False (got {moe.extra_mlp}).')
  layers = models.sparse_layer_indices(cfg.num_decoder_layers, moe.num_sparse_layers, moe.sparse_layout)
  return DenseWarmup(model.clone(**{field: None}), steps, layers, moe.num_experts)


def upcycle_train_state(dense_params: Any, trainer: trainer_lib.Trainer, warmup: DenseWarmup, step: int,
                        seed: int) -> trainer_lib.TrainState:
  """The Lory model's state at the switch from the dense model's parameters at `step`.

  Parameters: `lory.upcycle_dense_to_lory` (every expert a copy of the dense FFN, routers from
  Normal(0, 0.02) drawn from RANDOM_SEED and the step, so a resumed run draws the same ones).
  Optimizer state: fresh, except that the learning-rate schedule goes on from `step`. Adafactor's
  statistics do not carry over: the expert kernels have other shapes (per-expert factored statistics), and
  an expert's gradient is its merge weight (≈ 1/E) times the merged FFN's, so the dense statistics would
  mis-scale it; a fresh state restarts Adafactor's β₂ schedule (v = g² on the first Lory step), as t5x's
  step_offset does when fine-tuning.
  """
  import jax  # pylint: disable=g-import-not-at-top
  rng = jax.random.fold_in(jax.random.key(seed), step)
  upcycle = lambda params: lory_lib.upcycle_dense_to_lory(
      params, num_experts=warmup.num_experts, layer_indices=warmup.layer_indices, rng=rng)
  with partitioning.activate(trainer.mesh, trainer.rules):
    params = jax.jit(upcycle, out_shardings=trainer.param_shardings)(dense_params)
  opt_state = continue_schedule(trainer.init_opt_state(params), step)
  return trainer.create_state(params, opt_state, step)


def continue_schedule(opt_state: Any, step: int) -> Any:
  """opt_state with every learning-rate schedule's count (optax.ScaleByScheduleState) set to `step`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  def at_step(node):
    if isinstance(node, optax.ScaleByScheduleState):
      count = jax.device_put(jnp.asarray(step, node.count.dtype), node.count.sharding)
      return node._replace(count=count)
    return node
  return jax.tree.map(at_step, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


def _holds_lory_model(checkpoint_dir: str, warmup: DenseWarmup) -> bool:
  """Whether a checkpoint's parameters are the Lory model's (a router in a Lory layer) or the dense one's."""
  saved = ckpt_lib.flat_paths(ckpt_lib.saved_param_shapes(os.path.join(checkpoint_dir, 'params')))
  prefixes = tuple(f'decoder/layers_{i}/mlp/router/' for i in warmup.layer_indices)
  return any(path.startswith(prefixes) for path in saved)


def fit_with_dense_warmup(dense_trainer: trainer_lib.Trainer, lory_trainer: trainer_lib.Trainer,
                          warmup: DenseWarmup, model_dir: str, train_data: data_lib.DataIterator,
                          loop: trainer_lib.LoopConfig, *, seed: int = 0,
                          print_fn: Optional[Callable[[str], None]] = None, **fit_kwargs
                          ) -> trainer_lib.TrainState:
  """trainer.fit in two parts: the dense model to step W, then the upcycled Lory model to TRAIN_STEPS.

  Resuming goes by what MODEL_DIR's latest checkpoint holds: the Lory model resumes the Lory part; the
  dense model (or none) resumes the dense part, and the switch happens at max(W, its step). The dense part
  ends with a dense checkpoint_W; the switch itself saves nothing, so a run stopped right after it redoes
  it identically. fit_kwargs (eval_data, eval_name) go to both parts.
  """
  print_fn = print_fn or (lambda line: print(line, flush=True))
  try:
    latest = ckpt_lib.resolve_checkpoint_dir(model_dir)
  except FileNotFoundError:
    latest = None
  if latest is not None and _holds_lory_model(latest, warmup):
    return trainer_lib.fit(lory_trainer, model_dir, train_data, loop, print_fn=print_fn, **fit_kwargs)
  dense_steps = max(warmup.steps, ckpt_lib.checkpoint_step(latest) if latest else 0)
  print_fn(f'Lory dense warm-up: the dense model trains to step {dense_steps}, then its FFN is copied into '
           f'the {warmup.num_experts} experts of decoder layers {list(warmup.layer_indices)}.')
  dense = trainer_lib.fit(dense_trainer, model_dir, train_data,
                          dataclasses.replace(loop, train_steps=dense_steps), print_fn=print_fn, **fit_kwargs)
  step, dense_params = int(dense.step), [dense.params]
  del dense  # the dense optimizer state, and (after the switch, `pop`) the dense parameters, are freed
  print_fn(f'Lory dense warm-up: switched to the Lory model at step {step} (fresh optimizer state, '
           f'learning-rate schedule continued).')
  start = lambda trainer: upcycle_train_state(dense_params.pop(), trainer, warmup, step, seed)
  return trainer_lib.fit(lory_trainer, model_dir, train_data, loop, start_state=start, print_fn=print_fn,
                         **fit_kwargs)


# ---------------------------------------------------------------------------------------------------------
# The training run.

def train(*, model: Any = gin.REQUIRED, model_dir: Optional[str] = gin.REQUIRED,
          train_steps: int = gin.REQUIRED, train_dataset_cfg: data_lib.DatasetConfig = gin.REQUIRED,
          train_eval_dataset_cfg: Optional[data_lib.DatasetConfig] = None,
          learning_rate: Any = gin.REQUIRED, optimizer: Callable[..., Any] = optim.adafactor,
          initial_checkpoint_path: Optional[str] = None, train_steps_relative: Optional[int] = None,
          num_expert_partitions: int = 1, num_model_partitions: int = 1,
          z_loss: float = 1e-4, label_smoothing: float = 0.0, aux_loss_factor: float = 0.01,
          router_z_loss_factor: float = 1e-4, loss_normalizing_factor: Optional[float] = None,
          log_period: int = 100, eval_period: int = 1000, eval_steps: Optional[int] = 20,
          checkpoint_period: int = 1000, keep_checkpoints: Optional[int] = None,
          async_checkpointing: bool = True, random_seed: Optional[int] = 0,
          freeze_patterns: Sequence[str] = (),
          lory_dense_warmup_fraction: float = 0.0) -> trainer_lib.TrainState:
  """Trains `model` on train_dataset_cfg to TRAIN_STEPS (or checkpoint step + TRAIN_STEPS_RELATIVE).

  lory_dense_warmup_fraction: LORY_DENSE_WARMUP_FRACTION (gin/runs/lory_warmup.gin): a Lory model's first
    round(fraction · TRAIN_STEPS) steps train its dense counterpart, which is then upcycled
    (`fit_with_dense_warmup`); 0 trains the Lory model from the start.
  """
  model_dir = required(model_dir, 'MODEL_DIR', '"\'runs/my_run\'"')
  if train_steps_relative is not None:
    start = 0
    if initial_checkpoint_path:
      start = ckpt_lib.checkpoint_step(ckpt_lib.resolve_checkpoint_dir(initial_checkpoint_path))
    train_steps = start + train_steps_relative
  warmup = lory_dense_warmup(model, lory_dense_warmup_fraction, train_steps)
  if warmup is not None and initial_checkpoint_path:
    raise UserError('The Lory dense warm-up trains the dense model from scratch; it does not combine with '
                    'INITIAL_CHECKPOINT_PATH. Set LORY_DENSE_WARMUP_FRACTION = 0 to fine-tune.')
  os.makedirs(model_dir, exist_ok=True)
  mesh = create_mesh(num_expert_partitions, num_model_partitions, model)
  check_batch(train_dataset_cfg.batch_size, mesh)
  import jax  # pylint: disable=g-import-not-at-top
  kind = data_lib.model_kind_of(model)
  shard = data_lib.shard_info()
  train_data = data_lib.DataIterator(
      data_lib.get_dataset(train_dataset_cfg, kind, num_processes=jax.process_count(), shard=shard))
  eval_data = None
  if train_eval_dataset_cfg is not None and eval_period:
    eval_ds = data_lib.get_dataset(train_eval_dataset_cfg, kind, num_processes=jax.process_count(),
                                   shard=shard)
    eval_data = lambda: data_lib.DataIterator(eval_ds)
  loss_config = trainer_lib.LossConfig(z_loss, label_smoothing, aux_loss_factor, router_z_loss_factor,
                                       loss_normalizing_factor)
  trainer = trainer_lib.Trainer(model, optimizer, learning_rate, mesh, loss_config=loss_config,
                                seed=random_seed or 0, freeze_patterns=freeze_patterns)
  write_config(model_dir, gin.config_str())  # every binding; replaced by the operative config at the end
  loop = trainer_lib.LoopConfig(train_steps, train_dataset_cfg.batch_size, log_period, eval_period,
                                eval_steps, checkpoint_period, keep_checkpoints, async_checkpointing)
  eval_name = (train_eval_dataset_cfg or train_dataset_cfg).mixture_or_task_name
  if warmup is None:
    state = trainer_lib.fit(trainer, model_dir, train_data, loop, eval_data=eval_data, eval_name=eval_name,
                            initial_checkpoint_path=initial_checkpoint_path)
  else:
    dense_trainer = trainer_lib.Trainer(warmup.dense_model, optimizer, learning_rate, mesh,
                                        loss_config=loss_config, seed=random_seed or 0,
                                        freeze_patterns=freeze_patterns)
    state = fit_with_dense_warmup(dense_trainer, trainer, warmup, model_dir, train_data, loop,
                                  seed=random_seed or 0, eval_data=eval_data, eval_name=eval_name)
  write_model_info(model_dir, trainer)
  return state


def write_config(model_dir: str, text: str) -> None:
  """MODEL_DIR/config.gin (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
      f.write(text)


if __name__ != '__main__':
  train = gin.configurable('train', module='train_script')(train)


def _main(flags: argparse.Namespace) -> None:
  del flags
  call_configurable(train, 'train')
  # gin records a configurable's parameters when its call returns: now the operative config is complete.
  write_config(gin_setup.macro('MODEL_DIR'), gin.operative_config_str())


def main(argv: Optional[Sequence[str]] = None) -> None:
  run_main(_main, 'Train an ST-MoE model (t5x-style gin configuration).', argv)


if __name__ == '__main__':
  from st_moe_jax import train as _registered  # pylint: disable=g-import-not-at-top
  _registered.main()
