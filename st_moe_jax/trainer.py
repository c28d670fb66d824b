"""Train and eval steps, the training loop, metrics (TensorBoard + console).

  init ─► loop: batch ─► train_step (jit, sharded) ─► log / eval / checkpoint ─► ... ─► final checkpoint

The steps are jit-compiled with explicit in/out shardings from partitioning.py and traced inside
`partitioning.activate(mesh, rules)`, so the MoE layer's logical sharding constraints apply. The loss is
losses.compute_loss on the model's logits and the 'intermediates' the MoE layers sow; metric names are
t5x's (loss, cross_ent_loss, z_loss, accuracy, experts/...).

Batches are dicts of <int32>[B, L] arrays from data.py (B = BATCH_SIZE over all processes).
"""

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from st_moe_jax import checkpoint_manager as ckpt_lib
from st_moe_jax import data as data_lib
from st_moe_jax import losses
from st_moe_jax import optim
from st_moe_jax import partitioning

PyTree = Any
Batch = Mapping[str, Any]
MOE_METRICS = losses.MOE_METRIC_NAMES
# Byte vocabularies (seqio.ByteVocabulary): ids 0-2 are pad / EOS / UNK, then one id per byte.
BYTE_ID_OFFSET = 3


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; training stopped before saving anything from that point on."""


@flax.struct.dataclass
class TrainState:
  """step <int32>[], params and the optimizer state (both trees of float32 arrays)."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """losses.compute_loss options (t5x macros: Z_LOSS, LABEL_SMOOTHING, AUX_LOSS_FACTOR,
  ROUTER_Z_LOSS_FACTOR, LOSS_NORMALIZING_FACTOR)."""
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  aux_loss_factor: float = 0.01
  router_z_loss_factor: float = 1e-4
  loss_normalizing_factor: Optional[float] = None


def model_inputs(batch: Batch, model_kind: str) -> dict[str, Any]:
  """The model's keyword arguments from a converted batch (decoder_loss_weights goes to the loss)."""
  names = ['decoder_input_tokens', 'decoder_target_tokens', 'decoder_segment_ids', 'decoder_positions']
  if model_kind == data_lib.ENCODER_DECODER:
    names += ['encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions']
  else:
    names += ['decoder_causal_attention']
  return {k: batch[k] for k in names if k in batch}


def per_layer_moe_metrics(intermediates: PyTree) -> dict[str, jax.Array]:
  """{'decoder/layers_1/expert_usage': scalar, ...}: each MoE layer's sown metrics (mean over calls)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  out = {}
  for path, value in flat.items():
    if path[-1] in MOE_METRICS:
      layer = '/'.join(str(p) for p in path[:-1] if p != 'mlp')
      out[f'{layer}/{path[-1]}'] = jnp.mean(jnp.stack([jnp.mean(v) for v in jax.tree.leaves(value)]))
  return out


class Trainer:
  """Jitted, sharded train and eval steps for one model.

  Args:
    model: models.EncoderDecoder or models.DecoderOnly.
    make_optimizer: (learning_rate_schedule, factor_rules) -> optax transformation, e.g. optim.adafactor.
    learning_rate: an optax schedule of the step.
    mesh, rules: from partitioning.create_mesh / standard_logical_axis_rules.
    loss_config: LossConfig.
    seed: RANDOM_SEED for parameter init; dropout / jitter keys are fold_in(seed, step), so a resumed run
      draws the same randomness as an uninterrupted one.
    freeze_patterns: regexes of parameter paths to keep fixed (optim.freeze), e.g. ST-MoE's experts and
      routers when fine-tuning.
  """

  def __init__(self, model: nn.Module, make_optimizer: Callable[..., optax.GradientTransformation],
               learning_rate: optax.Schedule, mesh: jax.sharding.Mesh,
               rules: Optional[Sequence] = None, loss_config: LossConfig = LossConfig(), seed: int = 0,
               freeze_patterns: Sequence[str] = ()):
    self.model = model
    self.kind = data_lib.model_kind_of(model)
    self.make_optimizer = make_optimizer
    self.learning_rate = learning_rate
    self.mesh = mesh
    self.rules = rules or partitioning.standard_logical_axis_rules()
    self.loss_config = loss_config
    self.seed = seed
    self.freeze_patterns = tuple(freeze_patterns)
    self._compiled = None

  # ------------------------------------------------------------------------------------------- setup
  def _init_variables(self, rng: jax.Array, batch: Batch) -> PyTree:
    return self.model.init({'params': rng, 'dropout': rng}, **model_inputs(batch, self.kind),
                           enable_dropout=False)['params']

  def setup(self, batch: Batch) -> None:
    """Abstract shapes, shardings and the optimizer from one (host) batch's shapes; compiles nothing."""
    with partitioning.activate(self.mesh, self.rules):
      boxed = jax.eval_shape(self._init_variables, jax.random.key(0), batch)
      self.param_shardings = partitioning.param_shardings(boxed, self.mesh, self.rules)
    self.logical_axes = partitioning.logical_axes(boxed)
    tx = self.make_optimizer(self.learning_rate, optim.factor_rules(boxed))
    self.tx = optim.freeze(tx, self.freeze_patterns) if self.freeze_patterns else tx
    abstract_params = nn.unbox(boxed)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    self.opt_shardings = partitioning.opt_state_shardings(abstract_opt, abstract_params, self.param_shardings)
    self.abstract_params = _with_shardings(abstract_params, self.param_shardings)
    self.abstract_opt_state = _with_shardings(abstract_opt, self.opt_shardings)
    replicated = partitioning.replicated(self.mesh)
    self.state_shardings = TrainState(replicated, self.param_shardings, self.opt_shardings)
    self.batch_shardings = partitioning.batch_shardings(dict(batch), self.mesh)
    self._compile()

  def init_params(self) -> PyTree:
    """Fresh parameters (seeded by RANDOM_SEED), created directly with their shardings."""
    example = {k: jnp.zeros(v.shape, jnp.int32) for k, v in self.abstract_batch.items()}
    init = jax.jit(lambda rng: nn.unbox(self._init_variables(rng, example)),
                   out_shardings=self.param_shardings)
    with partitioning.activate(self.mesh, self.rules):
      return init(jax.random.key(self.seed))

  def init_opt_state(self, params: PyTree) -> PyTree:
    with partitioning.activate(self.mesh, self.rules):
      return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)

  def create_state(self, params: Optional[PyTree] = None, opt_state: Optional[PyTree] = None,
                   step: int = 0) -> TrainState:
    params = self.init_params() if params is None else params
    opt_state = self.init_opt_state(params) if opt_state is None else opt_state
    step = jax.device_put(jnp.asarray(step, jnp.int32), partitioning.replicated(self.mesh))
    return TrainState(step, params, opt_state)

  # ------------------------------------------------------------------------------------------- steps
  def _loss(self, params: PyTree, batch: Batch, rng: Optional[jax.Array], train: bool):
    logits, state = self.model.apply(
        {'params': params}, **model_inputs(batch, self.kind), enable_dropout=train,
        rngs={'dropout': rng} if train else None, mutable=['intermediates'])
    cfg = self.loss_config
    loss, metrics = losses.compute_loss(
        logits, batch['decoder_target_tokens'], batch.get('decoder_loss_weights'),
        state.get('intermediates'), z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing,
        aux_loss_factor=cfg.aux_loss_factor, router_z_loss_factor=cfg.router_z_loss_factor,
        loss_normalizing_factor=cfg.loss_normalizing_factor)
    return loss, (metrics, state.get('intermediates', {}))

  def _train_step(self, state: TrainState, batch: Batch):
    rng = jax.random.fold_in(jax.random.key(self.seed), state.step)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (_, (metrics, _)), grads = grad_fn(state.params, batch, rng, True)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite loss can still come with a non-finite update (e.g. an infinite gradient): both are checked
    # so that no checkpoint ever holds the parameters of a diverged step.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(optax.global_norm(updates))
    metrics = {**metrics, 'learning_rate': jnp.asarray(self.learning_rate(state.step), jnp.float32),
               'finite': finite}
    return TrainState(state.step + 1, params, opt_state), metrics

  def _eval_step(self, params: PyTree, batch: Batch) -> dict[str, jax.Array]:
    """Token sums (so batches of different fill average exactly) and per-layer MoE metrics."""
    _, (metrics, intermediates) = self._loss(params, batch, None, False)
    weights = batch.get('decoder_loss_weights', batch['decoder_target_tokens'] > 0).astype(jnp.float32)
    tokens = jnp.sum(weights)
    byte_tokens = jnp.sum(weights * (batch['decoder_target_tokens'] >= BYTE_ID_OFFSET))
    sums = {f'sum/{k}': v * tokens for k, v in metrics.items() if not k.startswith('experts/')}
    return {**sums, 'tokens': tokens, 'byte_tokens': byte_tokens,
            **{k: v for k, v in metrics.items() if k.startswith('experts/')},
            **{f'layer/{k}': v for k, v in per_layer_moe_metrics(intermediates).items()}}

  def _compile(self) -> None:
    replicated = partitioning.replicated(self.mesh)
    self._train = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_shardings),
                          out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval = jax.jit(self._eval_step, in_shardings=(self.param_shardings, self.batch_shardings),
                         out_shardings=replicated)

  @property
  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    return self._abstract_batch

  def global_batch(self, local: Batch) -> dict[str, jax.Array]:
    """This process's numpy rows → global arrays sharded over ('expert', 'data')."""
    return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], np.asarray(v))
            for k, v in local.items()}

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    with partitioning.activate(self.mesh, self.rules):
      return self._train(state, self.global_batch(batch))

  def eval_step(self, params: PyTree, batch: Batch) -> dict[str, jax.Array]:
    with partitioning.activate(self.mesh, self.rules):
      return self._eval(params, self.global_batch(batch))

  def prepare(self, local_batch: Batch) -> None:
    """setup() from a process-local batch (global batch = local rows × processes)."""
    rows = jax.process_count()
    self._abstract_batch = {k: jax.ShapeDtypeStruct((v.shape[0] * rows,) + v.shape[1:], v.dtype)
                            for k, v in local_batch.items()}
    self.setup(self._abstract_batch)


def _with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------------------------------
# Evaluation over many batches.

def evaluate(trainer: Trainer, params: PyTree, batches: Iterator[Batch], batch_size: int,
             max_batches: Optional[int] = None) -> dict[str, float]:
  """Teacher-forced metrics over `batches` (padded to batch_size), weighted by real target tokens.

  Returns:
    loss, cross_ent_loss, z_loss, accuracy (token averages), bits_per_token, bits_per_byte (cross-entropy
    in bits over byte tokens, ids >= 3, for a byte vocabulary), experts/... (batch means) and per-layer
    'layer/<stack>/layers_<i>/<metric>'.
  """
  totals: dict[str, float] = {}
  count = 0
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    out = jax.device_get(trainer.eval_step(params, data_lib.pad_batch(batch, batch_size)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    count += 1
  if not count:
    raise ValueError('The evaluation split gave no batches.')
  tokens = max(totals.pop('tokens'), 1.0)
  byte_tokens = totals.pop('byte_tokens')
  result = {k[len('sum/'):]: v / tokens for k, v in totals.items() if k.startswith('sum/')}
  result.update({k: v / count for k, v in totals.items() if not k.startswith('sum/')})
  result['bits_per_token'] = result['cross_ent_loss'] / math.log(2)
  if byte_tokens:
    result['bits_per_byte'] = totals['sum/cross_ent_loss'] / math.log(2) / byte_tokens
  result['eval_batches'] = count
  result['target_tokens'] = tokens
  return result


# ---------------------------------------------------------------------------------------------------------
# Metric writing.

class SummaryWriter:
  """TensorBoard scalars in event files under `directory` (process 0 only).

  Written with TF's core summary op and the 'scalars' plugin metadata, which is what tf.summary.scalar
  writes; it does not need the tensorboard package (not pinned here).
  """

  def __init__(self, directory: str):
    self._writer = None
    if jax.process_index() == 0:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars')).SerializeToString()
      self._writer = tf.summary.create_file_writer(directory)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    with self._writer.as_default():
      for tag, value in scalars.items():
        self._tf.summary.write(tag, self._tf.constant(float(value), self._tf.float32), step=step,
                               metadata=self._metadata)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _console_line(step: int, total: int, metrics: Mapping[str, float], steps_per_s: float,
                  tokens_per_s: float) -> str:
  return (f'step {step:>6d}/{total}  loss {metrics["loss"]:.4f}  ce {metrics["cross_ent_loss"]:.4f}  '
          f'acc {metrics["accuracy"]:.3f}  lr {metrics["learning_rate"]:.2e}  '
          f'| {steps_per_s:.2f} steps/s  {tokens_per_s / 1e3:.1f}k tokens/s')


# ---------------------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class LoopConfig:
  """train_steps: TRAIN_STEPS (absolute; includes a restored checkpoint's steps); log_period: steps per
  console line and TensorBoard point; eval_period / eval_steps: teacher-forced eval on the validation
  split every eval_period steps, eval_steps batches (None: the whole split); checkpoint_period / keep:
  orbax save period and how many checkpoints to keep."""
  train_steps: int
  batch_size: int
  log_period: int = 100
  eval_period: int = 1000
  eval_steps: Optional[int] = 20
  checkpoint_period: int = 1000
  keep: Optional[int] = None
  async_checkpointing: bool = True


def fit(trainer: Trainer, model_dir: str, train_data: data_lib.DataIterator, loop: LoopConfig, *,
        eval_data: Optional[Callable[[], Iterator[Batch]]] = None, eval_name: str = 'validation',
        initial_checkpoint_path: Optional[str] = None,
        start_state: Optional[Callable[[Trainer], TrainState]] = None,
        print_fn: Callable[[str], None] = None) -> TrainState:
  """Trains to loop.train_steps, resuming from MODEL_DIR's latest checkpoint if there is one.

  Args:
    trainer: the Trainer (set up by `fit` from the first batch).
    model_dir: MODEL_DIR.
    train_data: the training iterator; its position is saved with every checkpoint.
    eval_data: makes a fresh validation iterator (teacher-forced eval every loop.eval_period steps).
    eval_name: TensorBoard folder MODEL_DIR/training_eval/<eval_name> (the task name).
    initial_checkpoint_path: INITIAL_CHECKPOINT_PATH for fine-tuning when MODEL_DIR has no checkpoint.
    start_state: makes the state to start from once the trainer is set up, instead of resuming from
      MODEL_DIR's latest checkpoint (which is another model's: Lory's dense warm-up switches this way,
      `train.fit_with_dense_warmup`). train_data is used where it stands.

  Raises:
    TrainingDivergedError: NaN / inf loss. Nothing from the diverged steps is saved.
  """
  print_fn = print_fn or (lambda line: print(line, flush=True))
  manager = ckpt_lib.CheckpointManager(model_dir, loop.checkpoint_period, loop.keep, loop.async_checkpointing)
  first = next(train_data)
  trainer.prepare(first)
  if start_state is not None:
    state = start_state(trainer)
  else:
    state = _initial_state(trainer, manager, train_data, initial_checkpoint_path, print_fn)
  if start_state is not None or manager.latest_step() is None or int(state.step) != manager.latest_step():
    pending = [first]  # a fresh start (or a given one) trains on the batch used for shapes
  else:
    pending = []  # resumed: the restored iterator is positioned at the next batch
    if int(state.step) >= loop.train_steps:
      print_fn(f'{model_dir} is already at step {int(state.step)} >= TRAIN_STEPS={loop.train_steps}.')
      manager.close()
      return state
  train_writer = SummaryWriter(os.path.join(model_dir, 'train'))
  eval_writer = SummaryWriter(os.path.join(model_dir, 'training_eval', eval_name)) if eval_data else None
  first_bad = jnp.asarray(-1, jnp.int32)  # the first step whose loss was not finite, kept on device
  step = int(state.step)
  start = tic = time.time()
  window_steps, window_tokens, compile_s = 0, 0.0, None
  try:
    while step < loop.train_steps:
      batch = pending.pop() if pending else next(train_data)
      state, metrics = trainer.train_step(state, batch)
      step += 1
      first_bad = jnp.where((first_bad < 0) & ~metrics['finite'], step, first_bad)
      window_steps += 1
      window_tokens += float(np.sum(batch.get('decoder_loss_weights', batch['decoder_target_tokens'] > 0)))
      if compile_s is None:  # the first step includes compilation
        compile_s = time.time() - tic
        tic, window_steps, window_tokens = time.time(), 0, 0.0
      done = step == loop.train_steps
      if step % loop.log_period == 0 or done:
        _check_finite(first_bad, manager, model_dir)
        elapsed = max(time.time() - tic, 1e-9)
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items() if k != 'finite'}
        steps_per_s = window_steps / elapsed
        tokens_per_s = window_tokens * jax.process_count() / elapsed
        scalars.update({'timing/steps_per_second': steps_per_s,
                        'timing/seqs_per_second': steps_per_s * loop.batch_size,
                        'timing/target_tokens_per_second': tokens_per_s,
                        'timing/compilation_seconds': compile_s})
        train_writer.write(step, scalars)
        print_fn(_console_line(step, loop.train_steps, scalars, steps_per_s, tokens_per_s)
                 + f'  [{time.time() - start:.0f}s]')
        tic, window_steps, window_tokens = time.time(), 0, 0.0
      if eval_data is not None and (step % loop.eval_period == 0 or done):
        _check_finite(first_bad, manager, model_dir)
        eval_start = time.time()
        results = evaluate(trainer, state.params, eval_data(), loop.batch_size, loop.eval_steps)
        eval_writer.write(step, {k: v for k, v in results.items() if not k.startswith('layer/')})
        print_fn(f'eval  {step:>6d}  {eval_name}: loss {results["loss"]:.4f}  '
                 f'accuracy {results["accuracy"]:.3f}'
                 + (f'  bits/byte {results["bits_per_byte"]:.3f}' if 'bits_per_byte' in results else '')
                 + f'  [{time.time() - start:.0f}s]')
        tic += time.time() - eval_start  # throughput counts training time only
      if manager.should_save(step) or done:
        _check_finite(first_bad, manager, model_dir)
        manager.save(step, state.params, state.opt_state, train_data, force=True)
  finally:
    manager.wait_until_finished()
    manager.close()
    train_writer.close()
    if eval_writer:
      eval_writer.close()
  return state


def _check_finite(first_bad: jax.Array, manager: ckpt_lib.CheckpointManager, model_dir: str) -> None:
  bad = int(first_bad)
  if bad < 0:
    return
  manager.wait_until_finished()
  last = manager.latest_step()
  kept = (f'The last good checkpoint, {model_dir}/checkpoint_{last}, is untouched; a rerun resumes from it.'
          if last is not None else 'No checkpoint was saved before it.')
  raise TrainingDivergedError(
      f'The training loss (or its update) became NaN or infinite at step {bad}; training stopped and nothing '
      f'from that step on was saved. {kept} Try a lower learning rate, a larger warm-up, ROUTER_Z_LOSS_FACTOR > 0 or float32 '
      'activations.')


def _initial_state(trainer: Trainer, manager: ckpt_lib.CheckpointManager,
                   train_data: data_lib.DataIterator, initial_checkpoint_path: Optional[str],
                   print_fn: Callable[[str], None]) -> TrainState:
  """Resume from MODEL_DIR's latest checkpoint; else fine-tune from INITIAL_CHECKPOINT_PATH; else init."""
  latest = manager.latest_step()
  if latest is not None:
    params, opt_state = manager.restore(latest, trainer.abstract_params, trainer.abstract_opt_state,
                                        train_data)
    print_fn(f'Resumed from {manager.directory}/checkpoint_{latest}.')
    return trainer.create_state(params, opt_state, latest)
  if initial_checkpoint_path:
    restored, missing = ckpt_lib.restore_params(initial_checkpoint_path, trainer.abstract_params,
                                                partial=True)
    params = ckpt_lib.merge_params(trainer.init_params(), restored)
    step = ckpt_lib.checkpoint_step(ckpt_lib.resolve_checkpoint_dir(initial_checkpoint_path))
    print_fn(f'Fine-tuning from {initial_checkpoint_path} (step {step}); fresh optimizer state'
             + (f'; {len(missing)} new parameters initialised: {missing[:6]}' if missing else '') + '.')
    return trainer.create_state(params, None, step)
  return trainer.create_state()
