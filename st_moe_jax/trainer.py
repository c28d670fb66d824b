"""Train and eval steps, evaluation over a split, and the training loop with its resume policy.

  prepare (shapes) ─► init_state / resume / fine-tune ─► loop: batch ─► train_step (jit, sharded)
      ─► log (summaries.py) / eval / checkpoint ─► ... ─► final checkpoint

An Evaluator has the model, the mesh and the eval step (no optimizer: evaluate.py and infer.py use it); a
Trainer adds the optimizer, the train state and the train step.

The steps are jit-compiled with explicit in/out shardings from partitioning.py and traced inside
`partitioning.activate(mesh, rules)`, so the MoE layer's logical sharding constraints apply. The loss is
losses.compute_loss on the model's logits and the 'intermediates' the MoE layers sow; metric names are
t5x's (loss, cross_ent_loss, z_loss, accuracy, experts/...).

Batches are dicts of <int32>[B, L] arrays from data.py (B = BATCH_SIZE over all processes).
"""

import dataclasses
import functools
import math
import signal
import threading
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
from st_moe_jax import fileio
from st_moe_jax import losses
from st_moe_jax import optim
from st_moe_jax import partitioning
from st_moe_jax import summaries

PyTree = Any
Batch = Mapping[str, Any]
# Byte vocabularies (seqio.ByteVocabulary): ids 0-2 are pad / EOS / UNK, then one id per byte.
BYTE_ID_OFFSET = 3
# Each MoE layer's routing in TensorBoard, as experts/<stack>/layers_<i>/<name> (train and eval alike).
LAYER_METRIC_NAMES = ('expert_usage', 'fraction_tokens_left_behind', 'router_confidence')


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; training stopped before saving anything from that point on."""


@flax.struct.dataclass
class TrainState:
  """step <int32>[], params and the optimizer state (both trees of float32 arrays)."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree


def _is_schedule_state(node: Any) -> bool:
  return isinstance(node, optax.ScaleByScheduleState)


def continue_schedule(opt_state: PyTree, step: int) -> PyTree:
  """opt_state with every learning-rate schedule's count (optax.ScaleByScheduleState) set to `step`.

  A fresh optimizer state counts from 0; t5x evaluates the schedule at the global step, so a state that
  starts at step S (fine-tuning, Lory's switch) must count from S too. Works on traced states.
  """
  def at_step(node):
    if _is_schedule_state(node):
      return node._replace(count=jnp.asarray(step, node.count.dtype))
    return node
  return jax.tree.map(at_step, opt_state, is_leaf=_is_schedule_state)


def schedule_count(opt_state: PyTree) -> Optional[jax.Array]:
  """The step the optimizer's learning-rate schedule is at (what the next update uses); None without one."""
  counts = [n.count for n in jax.tree.leaves(opt_state, is_leaf=_is_schedule_state) if _is_schedule_state(n)]
  return counts[0] if counts else None


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """losses.compute_loss options (t5x macros: Z_LOSS, LABEL_SMOOTHING, AUX_LOSS_FACTOR,
  ROUTER_Z_LOSS_FACTOR, LOSS_NORMALIZING_FACTOR)."""
  z_loss: float = losses.Z_LOSS
  label_smoothing: float = 0.0
  aux_loss_factor: float = losses.AUX_LOSS_FACTOR
  router_z_loss_factor: float = losses.ROUTER_Z_LOSS_FACTOR
  loss_normalizing_factor: Optional[float] = None


def model_inputs(batch: Batch, model_kind: str) -> dict[str, Any]:
  """The model's keyword arguments from a converted batch (decoder_loss_weights goes to the loss)."""
  names = ['decoder_input_tokens', 'decoder_target_tokens', 'decoder_segment_ids', 'decoder_positions']
  if model_kind == data_lib.ENCODER_DECODER:
    names += ['encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions']
  else:
    names += ['decoder_causal_attention']
  return {k: batch[k] for k in names if k in batch}


class Evaluator:
  """A jitted, sharded eval step for one model, built from the model and the mesh alone (no optimizer);
  it evaluates whatever parameters it is given.

  Args:
    model: models.EncoderDecoder or models.DecoderOnly.
    mesh, rules: from partitioning.create_mesh / standard_logical_axis_rules.
    model_kind: data.ENCODER_DECODER or data.DECODER_ONLY (which batch features the model takes).
    loss_config: LossConfig.
    seed: RANDOM_SEED for parameter init.

  `prepare(first_batch)` fixes the shapes; then abstract_params, param_shardings and logical_axes are set.
  """

  def __init__(self, model: nn.Module, mesh: jax.sharding.Mesh, *, model_kind: str,
               rules: Optional[Sequence] = None, loss_config: LossConfig = LossConfig(), seed: int = 0):
    self.model = model
    self.kind = model_kind
    self.mesh = mesh
    self.rules = rules or partitioning.standard_logical_axis_rules()
    self.loss_config = loss_config
    self.seed = seed

  def prepare(self, local_batch: Batch) -> None:
    """Shapes and shardings from one process-local batch (global batch = local rows × processes); no
    arrays are made and nothing is compiled yet."""
    rows = jax.process_count()
    self.abstract_batch = {k: jax.ShapeDtypeStruct((v.shape[0] * rows,) + v.shape[1:], v.dtype)
                           for k, v in local_batch.items()}
    self.batch_shardings = partitioning.batch_shardings(self.abstract_batch, self.mesh)
    with partitioning.activate(self.mesh, self.rules):
      self.boxed_params = jax.eval_shape(self._boxed_params)
    self.param_shardings = partitioning.param_shardings(self.boxed_params, self.mesh, self.rules)
    self.logical_axes = partitioning.logical_axes(self.boxed_params)
    self.abstract_params = _with_shardings(nn.unbox(self.boxed_params), self.param_shardings)
    self._eval = jax.jit(self._eval_step, in_shardings=(self.param_shardings, self.batch_shardings),
                         out_shardings=partitioning.replicated(self.mesh))

  def _boxed_params(self) -> PyTree:
    """Fresh parameters with their logical-axes boxes; traced only (the key is made inside the trace, so
    nothing is placed on a device before the mesh says where)."""
    example = {k: jnp.zeros(v.shape, v.dtype) for k, v in self.abstract_batch.items()}
    rng = jax.random.key(self.seed)
    return self.model.init({'params': rng, 'dropout': rng}, **model_inputs(example, self.kind),
                           enable_dropout=False)['params']

  def init_params(self) -> PyTree:
    """Fresh parameters (seeded by RANDOM_SEED), created directly with their shardings."""
    with partitioning.activate(self.mesh, self.rules):
      return jax.jit(lambda: nn.unbox(self._boxed_params()), out_shardings=self.param_shardings)()

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

  def _eval_step(self, params: PyTree, batch: Batch) -> dict[str, jax.Array]:
    """Token sums (so batches of different fill average exactly) and per-layer MoE metrics."""
    _, (metrics, intermediates) = self._loss(params, batch, None, False)
    weights = batch.get('decoder_loss_weights', batch['decoder_target_tokens'] > 0).astype(jnp.float32)
    tokens = jnp.sum(weights)
    byte_tokens = jnp.sum(weights * (batch['decoder_target_tokens'] >= BYTE_ID_OFFSET))
    sums = {f'sum/{k}': v * tokens for k, v in metrics.items() if not k.startswith('experts/')}
    return {**sums, 'tokens': tokens, 'byte_tokens': byte_tokens,
            **{k: v for k, v in metrics.items() if k.startswith('experts/')},
            **{f'layer/{k}': v for k, v in losses.per_layer_moe_metrics(intermediates).items()}}

  def global_batch(self, local: Batch) -> dict[str, jax.Array]:
    """This process's numpy rows → global arrays sharded over ('expert', 'data')."""
    return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], np.asarray(v))
            for k, v in local.items()}

  def eval_step(self, params: PyTree, batch: Batch) -> dict[str, jax.Array]:
    with partitioning.activate(self.mesh, self.rules):
      return self._eval(params, self.global_batch(batch))


class Trainer(Evaluator):
  """An Evaluator plus the optimizer: the train state and a jitted, sharded train step.

  Args (besides Evaluator's):
    make_optimizer: (learning_rate_schedule, factor_rules) -> optax transformation, e.g. optim.adafactor.
    learning_rate: an optax schedule of the step.
    seed: RANDOM_SEED for parameter init; dropout / jitter keys are fold_in(seed, step), so a resumed run
      draws the same randomness as an uninterrupted one.
    freeze_patterns: regexes of parameter paths to keep fixed (optim.freeze), e.g. ST-MoE's experts and
      routers when fine-tuning.
  """

  def __init__(self, model: nn.Module, make_optimizer: Callable[..., optax.GradientTransformation],
               learning_rate: optax.Schedule, mesh: jax.sharding.Mesh, *, model_kind: str,
               rules: Optional[Sequence] = None, loss_config: LossConfig = LossConfig(), seed: int = 0,
               freeze_patterns: Sequence[str] = ()):
    super().__init__(model, mesh, model_kind=model_kind, rules=rules, loss_config=loss_config, seed=seed)
    self.make_optimizer = make_optimizer
    self.learning_rate = learning_rate
    self.freeze_patterns = tuple(freeze_patterns)

  def prepare(self, local_batch: Batch) -> None:
    """Evaluator.prepare, the optimizer, and the train state's shapes and shardings (`abstract_state`)."""
    super().prepare(local_batch)
    tx = self.make_optimizer(self.learning_rate, optim.factor_rules(self.boxed_params))
    self.tx = optim.freeze(tx, self.freeze_patterns) if self.freeze_patterns else tx
    with partitioning.activate(self.mesh, self.rules):
      abstract = jax.eval_shape(functools.partial(self._build_state, 0, None))
    opt_shardings = partitioning.opt_state_shardings(abstract.opt_state, abstract.params, self.param_shardings)
    self.state_shardings = TrainState(partitioning.replicated(self.mesh), self.param_shardings, opt_shardings)
    self.abstract_state = _with_shardings(abstract, self.state_shardings)
    self._train = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_shardings),
                          out_shardings=(self.state_shardings, partitioning.replicated(self.mesh)),
                          donate_argnums=(0,))

  def lower_steps(self) -> tuple[Any, Any]:
    """(train step, eval step) lowered for the abstract state and batch, not compiled: compile_tpu compiles
    them ahead of time for another platform's devices (the mesh's), with no array allocated."""
    with partitioning.activate(self.mesh, self.rules):
      return (self._train.lower(self.abstract_state, self.abstract_batch),
              self._eval.lower(self.abstract_params, self.abstract_batch))

  def _build_state(self, step: int, params: Optional[PyTree]) -> TrainState:
    """The one definition of a train state at `step` (traced): `params` where given (all of them, or the
    ones a fine-tuning checkpoint had), fresh ones from RANDOM_SEED elsewhere, and a fresh optimizer state
    whose learning-rate schedule goes on from `step`."""
    fresh = nn.unbox(self._boxed_params())  # unused leaves are dropped by XLA
    params = fresh if params is None else ckpt_lib.merge_params(fresh, params)
    opt_state = continue_schedule(self.tx.init(params), step)
    return TrainState(jnp.asarray(step, jnp.int32), params, opt_state)

  def init_state(self, step: int = 0, params: Optional[PyTree] = None) -> TrainState:
    """A train state at `step`, created directly with its shardings (see _build_state). `params` (a full
    or partial tree) is consumed: its buffers may be reused for the state's."""
    build = jax.jit(self._build_state, static_argnums=(0,), out_shardings=self.state_shardings,
                    donate_argnums=(1,))
    with partitioning.activate(self.mesh, self.rules):
      return build(step, params)

  def _train_step(self, state: TrainState, batch: Batch):
    rng = jax.random.fold_in(jax.random.key(self.seed), state.step)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (_, (metrics, intermediates)), grads = grad_fn(state.params, batch, rng, True)
    metrics = {**metrics, **layer_metrics(intermediates)}
    # The learning rate this update uses: the schedule at the optimizer's count.
    count = schedule_count(state.opt_state)
    learning_rate = self.learning_rate(state.step if count is None else count)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite loss can still come with a non-finite update (e.g. an infinite gradient): both are checked
    # so that no checkpoint ever holds the parameters of a diverged step.
    metrics = {**metrics, 'learning_rate': jnp.asarray(learning_rate, jnp.float32)}
    # Which values were not finite, in the order of nonfinite_names (the error names them).
    nonfinite = jnp.stack([~jnp.isfinite(metrics[k]) for k in sorted(metrics)]
                          + [~jnp.isfinite(optax.global_norm(updates))])
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(optax.global_norm(updates))
    metrics = {**metrics, 'finite': finite, 'nonfinite': nonfinite}
    return TrainState(state.step + 1, params, opt_state), metrics

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    with partitioning.activate(self.mesh, self.rules):
      return self._train(state, self.global_batch(batch))


def layer_metrics(intermediates: PyTree) -> dict[str, jax.Array]:
  """{'experts/decoder/layers_1/expert_usage': scalar, ...} for LAYER_METRIC_NAMES."""
  per_layer = losses.per_layer_moe_metrics(intermediates, LAYER_METRIC_NAMES)
  return {f'experts/{k}': v for k, v in per_layer.items()}


# Sums the logging period's metrics on device: one dispatch a step and no host sync until the log.
_add_metrics = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


def _with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------------------------------
# Evaluation over many batches.

def evaluate(evaluator: Evaluator, params: PyTree, batches: Iterator[Batch], batch_size: int,
             max_batches: Optional[int] = None,
             progress: Optional[summaries.Progress] = None, *, keep_batches: bool = False) -> dict:
  """Teacher-forced metrics over `batches` (padded to batch_size), weighted by real target tokens;
  `progress` (summaries.Progress) is told of each batch.

  Returns:
    loss, cross_ent_loss, z_loss, accuracy (token averages), bits_per_token, bits_per_byte (cross-entropy
    in bits over byte tokens, ids >= 3, for a byte vocabulary) and bits_per_byte_se (its standard error
    over the batches, ratio_standard_error; two batches or more), experts/... (batch means) and per-layer
    'layer/<stack>/layers_<i>/<metric>'. keep_batches: also 'batches', each batch's [cross-entropy sum in
    nats, byte tokens], so that two models evaluated on the same batches can be compared batch by batch
    (paired_difference).
  """
  totals: dict[str, float] = {}
  count = 0
  per_batch = []  # (cross-entropy sum, byte tokens) of each batch, for the standard error
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    out = jax.device_get(evaluator.eval_step(params, data_lib.pad_batch(batch, batch_size)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    per_batch.append((float(out['sum/cross_ent_loss']), float(out['byte_tokens'])))
    count += 1
    if progress is not None:
      progress.update()
  if progress is not None:
    progress.done()
  if not count:
    raise ValueError('The evaluation split gave no batches.')
  tokens = max(totals.pop('tokens'), 1.0)
  byte_tokens = totals.pop('byte_tokens')
  result = {k[len('sum/'):]: v / tokens for k, v in totals.items() if k.startswith('sum/')}
  result.update({k: v / count for k, v in totals.items() if not k.startswith('sum/')})
  result['bits_per_token'] = result['cross_ent_loss'] / math.log(2)
  if byte_tokens:
    result['bits_per_byte'] = totals['sum/cross_ent_loss'] / math.log(2) / byte_tokens
    if count > 1:
      result['bits_per_byte_se'] = ratio_standard_error(per_batch) / math.log(2)
  result['eval_batches'] = count
  result['target_tokens'] = tokens
  if keep_batches:
    result['batches'] = [list(pair) for pair in per_batch]
  return result


def paired_difference(batches_a: Sequence[Sequence[float]], batches_b: Sequence[Sequence[float]],
                      block: int = 1) -> tuple[float, float]:
  """(bits/byte of a − bits/byte of b, its standard error) for two models evaluated on the same batches
  (evaluate(..., keep_batches=True)'s 'batches'). The difference is taken batch by batch, so the noise of which
  text the batches hold, shared by both models, cancels: what is left is how differently the two models do
  on it. Needs >= 2 batches with equal byte counts.

  block: the SE counts runs of `block` consecutive batches as one observation (the last run may be shorter).
  Batches read in file order are not independent (neighbours share a file, and a model may do better on one
  file and worse on the next), and the per-batch SE then understates the noise.
  """
  a, b = np.asarray(batches_a, np.float64), np.asarray(batches_b, np.float64)
  if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 2 or len(a) < 2 or not np.array_equal(a[:, 1], b[:, 1]):
    raise ValueError('paired_difference needs the same >= 2 batches for both models ([cross-entropy sum, byte '
                     f'tokens] each, equal byte counts); got shapes {a.shape} and {b.shape}.')
  pairs = np.stack([a[:, 0] - b[:, 0], a[:, 1]], axis=1)
  delta = pairs[:, 0].sum() / pairs[:, 1].sum() / math.log(2)
  return float(delta), ratio_standard_error(pairs, block) / math.log(2)


def ratio_standard_error(pairs: Sequence[tuple[float, float]], block: int = 1) -> float:
  """Standard error of R = Σy / Σx over n batches (y_i, x_i), the delta-method (ratio estimator) formula
  sqrt(Σ(y_i − R·x_i)² / (n(n−1))) / mean(x): the noise of an evaluation from the batches it happened to
  read. Needs n >= 2.

  block: runs of `block` consecutive batches are summed into one observation first (the last run may be
  shorter; at least two runs), for batches that are not independent, e.g. read in file order.
  """
  pairs = np.asarray(pairs, np.float64)
  if block != 1:
    if not 1 <= block <= len(pairs) // 2:
      raise ValueError(f'block must be in [1, {len(pairs) // 2}] (two blocks at least) for {len(pairs)} batches, '
                       f'got {block}.')
    pairs = np.add.reduceat(pairs, np.arange(0, len(pairs), block), axis=0)
  y, x = pairs.T
  n = len(x)
  ratio = y.sum() / x.sum()
  return float(np.sqrt(np.sum((y - ratio * x) ** 2) / (n * (n - 1))) / x.mean())


# ---------------------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class LoopConfig:
  """train_steps: TRAIN_STEPS (absolute; includes a restored checkpoint's steps); log_period: steps per
  console line and TensorBoard point (each a mean over those steps, as t5x's); eval_period / eval_steps:
  teacher-forced eval on the validation split every eval_period steps, eval_steps batches (None: the whole
  split); checkpoint_period / keep: orbax save period and how many checkpoints to keep."""
  train_steps: int
  batch_size: int
  log_period: int = 100
  eval_period: int = 1000
  eval_steps: Optional[int] = 20
  checkpoint_period: int = 1000
  keep: Optional[int] = None
  async_checkpointing: bool = True


# Preemption (SIGTERM: TPU VMs, Kubernetes). Single-process runs catch the signal here and the loop saves at
# the next step; multi-process runs (jax.distributed) leave SIGTERM to JAX's preemption sync manager, which
# makes every process agree on the step to save at (CheckpointManager.reached_preemption).
_PREEMPTED = threading.Event()  # set once, never cleared: a process that was preempted trains no more


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _PREEMPTED.set()


def _install_sigterm_handler() -> Optional[Any]:
  """Installs _on_sigterm; returns the handler it replaced, or None where it installs nothing (not the
  main thread, or jax.distributed's own preemption notifier owns SIGTERM)."""
  if threading.current_thread() is not threading.main_thread() or jax.distributed.is_initialized():
    return None
  return signal.signal(signal.SIGTERM, _on_sigterm)


def fit(trainer: Trainer, model_dir: str, train_data: data_lib.DataIterator, loop: LoopConfig, *,
        eval_data: Optional[Callable[[], Iterator[Batch]]] = None, eval_name: str = 'validation',
        initial_checkpoint_path: Optional[str] = None,
        start_state: Optional[Callable[[Trainer], TrainState]] = None,
        print_fn: Callable[[str], None] = None) -> Optional[TrainState]:
  """Trains to loop.train_steps, resuming from MODEL_DIR's latest checkpoint if there is one.

  On SIGTERM (or, multi-process, at the preemption sync point) it saves a checkpoint at the current step,
  waits for it, prints one line and returns the state: the process can exit 0 and a rerun resumes
  exactly. A later call in a preempted process returns None at once.

  Args:
    trainer: the Trainer (set up by `fit` from the first batch).
    model_dir: MODEL_DIR.
    train_data: the training iterator; its position is saved with every checkpoint.
    eval_data: makes a fresh validation iterator (teacher-forced eval every loop.eval_period steps).
    eval_name: TensorBoard folder MODEL_DIR/training_eval/<eval_name> (the task name).
    initial_checkpoint_path: INITIAL_CHECKPOINT_PATH for fine-tuning when MODEL_DIR has no checkpoint.
    start_state: makes the state to start from once the trainer is set up, instead of resuming from
      MODEL_DIR's latest checkpoint (which is another model's: Lory's dense warm-up switches this way,
      `lory_warmup.fit_with_dense_warmup`). train_data is used where it stands.

  Raises:
    TrainingDivergedError: NaN / inf loss. Nothing from the diverged steps is saved.
    checkpoint_manager.CheckpointCorruptError: every checkpoint in MODEL_DIR is damaged.
  """
  if _PREEMPTED.is_set():
    return None
  previous = _install_sigterm_handler()
  try:
    return _fit(trainer, model_dir, train_data, loop, eval_data=eval_data, eval_name=eval_name,
                initial_checkpoint_path=initial_checkpoint_path, start_state=start_state, print_fn=print_fn)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _fit(trainer: Trainer, model_dir: str, train_data: data_lib.DataIterator, loop: LoopConfig, *,
         eval_data, eval_name, initial_checkpoint_path, start_state, print_fn) -> TrainState:
  print_fn = print_fn or (lambda line: print(line, flush=True))
  manager = ckpt_lib.CheckpointManager(model_dir, loop.checkpoint_period, loop.keep, loop.async_checkpointing)
  first = next(train_data)
  trainer.prepare(first)
  print_fn(summaries.startup_line(
      type(trainer.model).__name__, sum(int(x.size) for x in jax.tree.leaves(trainer.abstract_params)),
      trainer.mesh.shape, trainer.mesh.devices.ravel().tolist(),
      {k: v.shape for k, v in trainer.abstract_batch.items()}))
  if start_state is not None:
    state, resumed = start_state(trainer), False
  else:
    state, resumed = _initial_state(trainer, manager, train_data, initial_checkpoint_path, print_fn)
  # Resumed, the restored iterator is positioned at the next batch; otherwise the run trains on the batch
  # used for shapes.
  pending = [] if resumed else [first]
  if resumed and int(state.step) >= loop.train_steps:
    print_fn(f'{model_dir} is already at step {int(state.step)} >= TRAIN_STEPS={loop.train_steps}.')
    manager.close()
    return state
  train_writer = summaries.SummaryWriter(fileio.join(model_dir, 'train'))
  eval_writer = (summaries.SummaryWriter(fileio.join(model_dir, 'training_eval', eval_name))
                 if eval_data else None)
  first_bad = jnp.asarray(-1, jnp.int32)  # the first step whose loss was not finite, kept on device
  bad_values = None  # that step's `nonfinite` flags, kept on device too
  step = int(state.step)
  start = tic = time.time()
  window_steps, window_tokens, compile_s = 0, 0.0, None
  # Logged scalars are means over the steps since the last log, as t5x's (clu.metrics.Average).
  period_sums, period_steps = None, 0
  try:
    while step < loop.train_steps:
      batch = pending.pop() if pending else next(train_data)
      if compile_s is None:
        print_fn(f'compiling the train step (step {step + 1})...')
      state, metrics = trainer.train_step(state, batch)
      step += 1
      newly_bad = (first_bad < 0) & ~metrics['finite']
      first_bad = jnp.where(newly_bad, step, first_bad)
      bad_values = jnp.where(newly_bad, metrics['nonfinite'],
                             metrics['nonfinite'] if bad_values is None else bad_values)
      logged = {k: v for k, v in metrics.items() if k not in ('finite', 'nonfinite')}
      period_sums = logged if period_sums is None else _add_metrics(period_sums, logged)
      period_steps += 1
      window_steps += 1
      window_tokens += float(np.sum(batch.get('decoder_loss_weights', batch['decoder_target_tokens'] > 0)))
      done = step == loop.train_steps
      log_now = step % loop.log_period == 0 or done
      if compile_s is None:  # the first step (of a run or a resumed run) includes compilation
        compile_s = time.time() - tic
        # Throughput leaves compilation out, unless this step is logged at once: then it is this step's
        # (a window of no steps read 0.00 steps/s).
        if not log_now:
          print_fn(summaries.first_step_line(step, loop.train_steps, jax.device_get(logged), compile_s,
                                             time.time() - start))
          tic, window_steps, window_tokens = time.time(), 0, 0.0
      # Every step, on every process (the sync point is collective); saved before any log or eval so the
      # grace period goes to the checkpoint.
      preempted = manager.reached_preemption(step) or _PREEMPTED.is_set()
      if preempted and not done:
        _check_finite(first_bad, bad_values, metrics, manager, model_dir)
        manager.save(step, state.params, state.opt_state, train_data, force=True)
        manager.wait_until_finished()
        print_fn(f'Preempted (SIGTERM) at step {step}: saved checkpoint_{step}; rerun the same command to '
                 'resume.')
        return state
      if log_now:
        _check_finite(first_bad, bad_values, metrics, manager, model_dir)
        elapsed = max(time.time() - tic, 1e-9)
        scalars = {k: float(v) / period_steps for k, v in jax.device_get(period_sums).items()}
        period_sums, period_steps = None, 0
        steps_per_s = window_steps / elapsed
        tokens_per_s = window_tokens * jax.process_count() / elapsed
        scalars.update({'timing/steps_per_second': steps_per_s,
                        'timing/seqs_per_second': steps_per_s * loop.batch_size,
                        'timing/target_tokens_per_second': tokens_per_s,
                        'timing/compilation_seconds': compile_s})
        train_writer.write(step, scalars)
        print_fn(summaries.train_line(step, loop.train_steps, scalars, steps_per_s, tokens_per_s,
                                      time.time() - start))
        tic, window_steps, window_tokens = time.time(), 0, 0.0
      if eval_data is not None and (step % loop.eval_period == 0 or done):
        _check_finite(first_bad, bad_values, metrics, manager, model_dir)
        eval_start = time.time()
        results = evaluate(trainer, state.params, eval_data(), loop.batch_size, loop.eval_steps)
        # Per-layer results under the training tags: experts/<stack>/layers_<i>/<name>.
        eval_writer.write(step, {('experts/' + k[len('layer/'):] if k.startswith('layer/') else k): v
                                 for k, v in results.items()
                                 if not k.startswith('layer/') or k.endswith(LAYER_METRIC_NAMES)})
        print_fn(summaries.eval_line(step, eval_name, results, time.time() - start))
        tic += time.time() - eval_start  # throughput counts training time only
      if manager.should_save(step) or done:
        _check_finite(first_bad, bad_values, metrics, manager, model_dir)
        manager.save(step, state.params, state.opt_state, train_data, force=True)
  finally:
    manager.wait_until_finished()
    manager.close()
    train_writer.close()
    if eval_writer:
      eval_writer.close()
  return state


def _check_finite(first_bad: jax.Array, bad_values: jax.Array, metrics: Mapping[str, jax.Array],
                  manager: ckpt_lib.CheckpointManager, model_dir: str) -> None:
  """Raises TrainingDivergedError naming the first non-finite step and its non-finite values; called before
  every log, eval and save, so no checkpoint (periodic, final, preemption; async or not) holds that state."""
  bad = int(first_bad)
  if bad < 0:
    return
  names = sorted(k for k in metrics if k not in ('finite', 'nonfinite')) + ['update']
  which = ', '.join(n for n, flag in zip(names, np.asarray(bad_values)) if flag)
  manager.wait_until_finished()
  last = manager.latest_step()
  kept = (f'The last good checkpoint, {model_dir}/checkpoint_{last}, is untouched; a rerun resumes from it.'
          if last is not None else 'No checkpoint was saved before it.')
  raise TrainingDivergedError(
      f'The training loss (or its update) became NaN or infinite at step {bad} (non-finite: {which}); training stopped and nothing '
      f'from that step on was saved. {kept} Try a lower learning rate, a larger warm-up, ROUTER_Z_LOSS_FACTOR > 0 or float32 '
      'activations.')


def _initial_state(trainer: Trainer, manager: ckpt_lib.CheckpointManager,
                   train_data: data_lib.DataIterator, initial_checkpoint_path: Optional[str],
                   print_fn: Callable[[str], None]) -> tuple[TrainState, bool]:
  """(state, resumed): MODEL_DIR's latest checkpoint (with the data iterator's position); else fine-tuning
  from INITIAL_CHECKPOINT_PATH; else a fresh state.

  Fine-tuning keeps the checkpoint's step and, as t5x, the learning-rate schedule goes on from it; the
  optimizer state is fresh (new parameters are initialised).
  """
  # Newest first: a damaged checkpoint is moved aside (not deleted) and the one before it is tried.
  corrupt = []
  for latest in sorted(manager.all_steps(), reverse=True):
    abstract = trainer.abstract_state
    try:
      params, opt_state = manager.restore(latest, abstract.params, abstract.opt_state, train_data)
    except ckpt_lib.CheckpointCorruptError as e:
      aside = manager.move_aside(latest)
      corrupt.append(f'{e} (moved to {aside})')
      print_fn(f'WARNING: {e}; moved it to {fileio.basename(aside)} and trying the previous checkpoint.')
      continue
    print_fn(f'Resumed from {manager.directory}/checkpoint_{latest}.')
    step = jax.device_put(np.int32(latest), trainer.state_shardings.step)
    return TrainState(step, params, opt_state), True
  if corrupt:
    # Starting over silently would overwrite a long run's progress with a fresh one.
    raise ckpt_lib.CheckpointCorruptError(
        None, 'No intact checkpoint to resume from; every checkpoint in ' + manager.directory
        + ' is damaged:\n  ' + '\n  '.join(corrupt)
        + '\nRestore a copy of MODEL_DIR, or train in a fresh MODEL_DIR.')
  if initial_checkpoint_path:
    restored, missing = ckpt_lib.restore_params(initial_checkpoint_path, trainer.abstract_params,
                                                partial=True)
    step = ckpt_lib.checkpoint_step(ckpt_lib.resolve_checkpoint_dir(initial_checkpoint_path))
    print_fn(f'Fine-tuning from {initial_checkpoint_path} (step {step}); fresh optimizer state, learning-rate '
             f'schedule continued from step {step}'
             + (f'; {len(missing)} new parameters initialised: {missing[:6]}' if missing else '') + '.')
    return trainer.init_state(step, restored), False
  print_fn('initialising parameters and optimizer state...')
  return trainer.init_state(), False
