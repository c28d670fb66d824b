"""Lory's dense warm-up (docs/seed_methods.md §3.3): train the dense model for the first W steps, then copy its
FFN into every expert, draw a random router, and train the Lory model from step W on.

  train.py ─► lory_dense_warmup (the plan, or None) ─► fit_with_dense_warmup:
      trainer.fit(dense model, to W) ─► upcycle_train_state ─► trainer.fit(Lory model, to TRAIN_STEPS)
"""

import dataclasses
from typing import Any, Callable, Optional

import jax

from st_moe_jax import checkpoint_manager as ckpt_lib
from st_moe_jax import cli
from st_moe_jax import data as data_lib
from st_moe_jax import fileio
from st_moe_jax import lory as lory_lib
from st_moe_jax import models
from st_moe_jax import partitioning
from st_moe_jax import trainer as trainer_lib


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
    cli.UserError: a fraction outside [0, 1) or one that leaves no Lory step, a model without Lory layers,
      or Lory experts that a dense FFN cannot fill (other width or activations, or ST-MoE's extra FFN).
  """
  try:
    steps = lory_lib.dense_warmup_steps(fraction, train_steps)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  if not steps:
    return None
  field = {models.DecoderOnly: 'moe', models.EncoderDecoder: 'decoder_moe'}.get(type(model))
  moe = getattr(model, field) if field else None
  if moe is None or moe.moe_type != 'lory' or not moe.num_sparse_layers:
    raise cli.UserError(f'LORY_DENSE_WARMUP_FRACTION={fraction} warms up a Lory model, but this model has no '
                        f'Lory layers; include gin/routers/lory.gin (after the model file and '
                        f'gin/runs/decoder_only.gin), or drop gin/runs/lory_warmup.gin.')
  cfg = model.config
  if (moe.expert_mlp_dim not in (None, cfg.mlp_dim) or moe.expert_activations not in (None, cfg.activations)
      or moe.extra_mlp):
    raise cli.UserError(f'The dense warm-up copies the dense FFN into every Lory expert, so the experts must '
                        f'be that FFN: set EXPERT_MLP_DIM = MLP_DIM (got {moe.expert_mlp_dim} vs '
                        f'{cfg.mlp_dim}), the same activations, and EXTRA_MLP = False (got {moe.extra_mlp}).')
  layers = models.sparse_layer_indices(cfg.num_decoder_layers, moe.num_sparse_layers, moe.sparse_layout)
  return DenseWarmup(model.clone(**{field: None}), steps, layers, moe.num_experts)


def upcycle_train_state(dense_params: Any, trainer: trainer_lib.Trainer, warmup: DenseWarmup, step: int,
                        seed: int) -> trainer_lib.TrainState:
  """The Lory model's state at the switch from the dense model's parameters at `step`.

  Parameters: `lory.upcycle_dense_to_lory` (every expert a copy of the dense FFN, routers from
  Normal(0, 0.02) drawn from RANDOM_SEED and the step, so a resumed run draws the same ones).
  Optimizer state: fresh, except that the learning-rate schedule goes on from `step` (Trainer.init_state).
  Adafactor's statistics do not carry over: the expert kernels have other shapes (per-expert factored
  statistics), and an expert's gradient is its merge weight (≈ 1/E) times the merged FFN's, so the dense
  statistics would mis-scale it; a fresh state restarts Adafactor's β₂ schedule (v = g² on the first Lory
  step), as t5x's step_offset does when fine-tuning.
  """
  def upcycle(params):
    rng = jax.random.fold_in(jax.random.key(seed), step)  # made in the trace, like every key
    return lory_lib.upcycle_dense_to_lory(params, num_experts=warmup.num_experts,
                                          layer_indices=warmup.layer_indices, rng=rng)
  with partitioning.activate(trainer.mesh, trainer.rules):
    params = jax.jit(upcycle, out_shardings=trainer.param_shardings)(dense_params)
  return trainer.init_state(step, params)


def _holds_lory_model(checkpoint_dir: str, warmup: DenseWarmup) -> bool:
  """Whether a checkpoint's parameters are the Lory model's (a router in a Lory layer) or the dense one's."""
  saved = ckpt_lib.flat_paths(ckpt_lib.saved_param_shapes(fileio.join(checkpoint_dir, 'params')))
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
  latest = ckpt_lib.latest_checkpoint_step(model_dir)
  if latest is not None and _holds_lory_model(fileio.join(model_dir, f'checkpoint_{latest}'), warmup):
    return trainer_lib.fit(lory_trainer, model_dir, train_data, loop, print_fn=print_fn, **fit_kwargs)
  dense_steps = max(warmup.steps, latest or 0)
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
