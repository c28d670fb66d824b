r"""Training entry point, t5x style:

  python -m st_moe_jax.train --gin_file=gin/runs/pretrain.gin --gin_file=gin/models/st_moe_tiny.gin \
      --gin.MODEL_DIR="'runs/demo'" --gin.TRAIN_STEPS=1000 \
      --gin.MIXTURE_OR_TASK_NAME="'stdlib_span_corruption'" \
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 256, 'targets': 64}"

Flags are cli.py's (--gin_file, --gin.NAME=VALUE, ...). MODEL_DIR gets the checkpoints, TensorBoard files
(train/, training_eval/<task>/), config.gin (the latest run's operative gin config), config-<step>.gin
(every binding of each run, named by the step it started from; never overwritten) and model-info.txt.
A resume is checked against the checkpoint (BATCH_SIZE, parameter shapes) before any of these is written.
"""

import st_moe_jax  # pylint: disable=g-bad-import-order  (first: TensorFlow's start-up lines are dropped)
if __name__ == '__main__':  # a line within the first second: the imports below take several
  print('st_moe_jax.train: loading JAX and TensorFlow...', flush=True)
st_moe_jax.import_tensorflow_quietly()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import functools
import re
from typing import Any, Callable, Optional, Sequence

import gin

from st_moe_jax import checkpoint_manager as ckpt_lib
from st_moe_jax import cli
from st_moe_jax import data as data_lib
from st_moe_jax import fileio
from st_moe_jax import gin_setup
from st_moe_jax import losses
from st_moe_jax import lory_warmup
from st_moe_jax import optim
from st_moe_jax import trainer as trainer_lib


def train(*, model: Any = gin.REQUIRED, model_dir: Optional[str] = gin.REQUIRED,
          train_steps: int = gin.REQUIRED, train_dataset_cfg: data_lib.DatasetConfig = gin.REQUIRED,
          train_eval_dataset_cfg: Optional[data_lib.DatasetConfig] = None,
          learning_rate: Any = gin.REQUIRED, optimizer: Callable[..., Any] = optim.adafactor,
          initial_checkpoint_path: Optional[str] = None, train_steps_relative: Optional[int] = None,
          num_expert_partitions: int = 1, num_model_partitions: int = 1,
          z_loss: float = losses.Z_LOSS, label_smoothing: float = 0.0,
          aux_loss_factor: float = losses.AUX_LOSS_FACTOR,
          router_z_loss_factor: float = losses.ROUTER_Z_LOSS_FACTOR,
          loss_normalizing_factor: Optional[float] = None,
          log_period: int = 100, eval_period: int = 1000, eval_steps: Optional[int] = 20,
          checkpoint_period: int = 1000, keep_checkpoints: Optional[int] = None,
          async_checkpointing: bool = True, random_seed: Optional[int] = 0,
          freeze_patterns: Sequence[str] = (), lory_dense_warmup_fraction: float = 0.0,
          devices: Optional[Sequence[Any]] = None,
          print_fn: Optional[Callable[[str], None]] = None) -> Optional[trainer_lib.TrainState]:
  """Trains `model` on train_dataset_cfg to TRAIN_STEPS (or checkpoint step + TRAIN_STEPS_RELATIVE).

  lory_dense_warmup_fraction: LORY_DENSE_WARMUP_FRACTION (gin/runs/lory_warmup.gin): a Lory model's first
    round(fraction · TRAIN_STEPS) steps train its dense counterpart, which is then upcycled
    (`lory_warmup.fit_with_dense_warmup`); 0 trains the Lory model from the start.
  devices: the devices the mesh spans (default: all of jax.devices()).
  print_fn: where the progress lines go (default: print), one call per line; e.g. a notebook's live loss
    plot (notebooks/st_moe_quickstart.ipynb). Not a gin parameter.

  Returns:
    The final train state; None when MODEL_DIR is already at TRAIN_STEPS (nothing is built then).
  """
  model_dir = cli.required(model_dir, 'MODEL_DIR', '"\'runs/my_run\'"')
  print_fn = print_fn or (lambda line: print(line, flush=True))
  if train_steps_relative is None:
    _check_steps(train_steps, 'TRAIN_STEPS')
  else:
    _check_steps(train_steps_relative, 'TRAIN_STEPS_RELATIVE')
    start = 0
    if initial_checkpoint_path:
      cli.check_checkpoint_path(initial_checkpoint_path)
      start = ckpt_lib.checkpoint_step(ckpt_lib.resolve_checkpoint_dir(initial_checkpoint_path))
    train_steps = start + train_steps_relative
  warmup = lory_warmup.lory_dense_warmup(model, lory_dense_warmup_fraction, train_steps)
  if warmup is not None and initial_checkpoint_path:
    raise cli.UserError('The Lory dense warm-up trains the dense model from scratch; it does not combine with '
                        'INITIAL_CHECKPOINT_PATH. Set LORY_DENSE_WARMUP_FRACTION = 0 to fine-tune.')
  # The initial checkpoint is read when MODEL_DIR has none yet (a resumed run ignores it).
  if initial_checkpoint_path and ckpt_lib.latest_checkpoint_step(model_dir) is None:
    cli.check_checkpoint_path(initial_checkpoint_path)
  kind = cli.model_kind(model)
  cli.check_writable(model_dir, 'MODEL_DIR')  # before any work: its results would be lost
  mesh = cli.create_mesh(num_expert_partitions, num_model_partitions, model, devices)
  model = cli.with_expert_replicas(model, mesh)
  cli.check_batch(train_dataset_cfg.batch_size, mesh)
  done = ckpt_lib.latest_checkpoint_step(model_dir)
  if done is not None and done >= train_steps:
    # Nothing to train: no data pipeline, no compilation.
    print_fn(f'{model_dir} is already at step {done} >= TRAIN_STEPS={train_steps}.')
    return None
  if done is not None:
    check_resume_batch_size(model_dir, done, train_dataset_cfg.batch_size)
    # Before the data pipeline and config.gin: another process count cannot continue the saved positions.
    ckpt_lib.check_process_count(fileio.join(model_dir, f'checkpoint_{done}'))
  import jax  # pylint: disable=g-import-not-at-top
  cli.check_task_fits_model(train_dataset_cfg, kind)
  if train_eval_dataset_cfg is not None and eval_period:
    cli.check_task_fits_model(train_eval_dataset_cfg, kind)
  if jax.process_index() == 0:
    print_fn(f'data: {train_dataset_cfg.mixture_or_task_name!r} ({train_dataset_cfg.split}), batch '
             f'{train_dataset_cfg.batch_size}, lengths {dict(train_dataset_cfg.task_feature_lengths or {})}; '
             'building the pipeline...')
  shard = data_lib.shard_info()
  train_ds = data_lib.get_dataset(train_dataset_cfg, kind, num_processes=jax.process_count(), shard=shard)
  train_data = data_lib.DataIterator(train_ds)
  eval_data = None
  if train_eval_dataset_cfg is not None and eval_period:
    eval_data = data_lib.evaluation_reader(train_eval_dataset_cfg, kind, num_processes=jax.process_count(),
                                           shard=shard)
  loss_config = trainer_lib.LossConfig(z_loss, label_smoothing, aux_loss_factor, router_z_loss_factor,
                                       loss_normalizing_factor)
  make_trainer = lambda m: trainer_lib.Trainer(
      m, optimizer, learning_rate, mesh, model_kind=kind, loss_config=loss_config, seed=random_seed or 0,
      freeze_patterns=freeze_patterns)
  trainer = make_trainer(model)
  # The dense warm-up's checkpoints hold another model; fit_with_dense_warmup sorts out which one resumes.
  if done is not None and warmup is None:
    check_resume_shapes(trainer, model_dir, done, train_ds)
  start = done if done is not None else _initial_step(initial_checkpoint_path)
  # Every binding; config.gin is replaced by the operative config at the end, the history file is kept.
  write_config(model_dir, gin.config_str(), start)
  loop = trainer_lib.LoopConfig(train_steps, train_dataset_cfg.batch_size, log_period, eval_period,
                                eval_steps, checkpoint_period, keep_checkpoints, async_checkpointing)
  eval_name = (train_eval_dataset_cfg or train_dataset_cfg).mixture_or_task_name
  if warmup is None:
    state = trainer_lib.fit(trainer, model_dir, train_data, loop, eval_data=eval_data, eval_name=eval_name,
                            initial_checkpoint_path=initial_checkpoint_path, print_fn=print_fn)
  else:
    state = lory_warmup.fit_with_dense_warmup(
        make_trainer(warmup.dense_model), trainer, warmup, model_dir, train_data, loop,
        seed=random_seed or 0, eval_data=eval_data, eval_name=eval_name, print_fn=print_fn)
  write_model_info(model_dir, trainer)
  return state


def _check_steps(steps: Any, macro: str) -> None:
  # 0 or fewer steps would train nothing and exit 0 as if it had worked.
  if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
    raise cli.UserError(f'{macro}={steps!r} must be a positive whole number of steps, e.g. '
                        f'--gin.{macro}=1000.')


def _initial_step(initial_checkpoint_path: Optional[str]) -> int:
  if not initial_checkpoint_path:
    return 0
  return ckpt_lib.checkpoint_step(ckpt_lib.resolve_checkpoint_dir(initial_checkpoint_path))


_HISTORY = re.compile(r'config-(\d+)(?:-(\d+))?\.gin')


def history_configs(model_dir: str) -> list[tuple[int, int, str]]:
  """(start step, n, path) of MODEL_DIR's config-<step>.gin / config-<step>-<n>.gin files, oldest first."""
  found = []
  for name in fileio.listdir(model_dir) if fileio.isdir(model_dir) else []:
    m = _HISTORY.fullmatch(name)
    if m:
      found.append((int(m.group(1)), int(m.group(2) or 1), fileio.join(model_dir, name)))
  return sorted(found)


def write_config(model_dir: str, text: str, start_step: Optional[int] = None) -> None:
  """MODEL_DIR/config.gin (process 0), and with start_step the run's history file config-<step>.gin.

  A history file is never overwritten: a second run from the same step (e.g. a fresh start after a run that
  saved no checkpoint) gets config-<step>-2.gin, and so on.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  if start_step is not None:
    taken = {path for _, _, path in history_configs(model_dir)}
    path, n = fileio.join(model_dir, f'config-{start_step}.gin'), 1
    while path in taken or fileio.exists(path):
      n += 1
      path = fileio.join(model_dir, f'config-{start_step}-{n}.gin')
    with fileio.open(path, 'x') as f:  # 'x': fails rather than overwrite
      f.write(text)
  fileio.write_text(fileio.join(model_dir, 'config.gin'), text)


def _recorded_batch_size(path: str) -> Optional[int]:
  """The training batch size a saved config file binds (directly or through a macro); None if unclear."""
  text = fileio.read_text(path)
  m = re.search(r'^train/\S*DatasetConfig\.batch_size\s*=\s*(\S+)\s*$', text, re.MULTILINE)
  if not m:
    return None
  value = m.group(1)
  if value.startswith('%'):
    m = re.search(rf'^{re.escape(value[1:])}\s*=\s*(\S+)\s*$', text, re.MULTILINE)
    value = m.group(1) if m else ''
  return int(value) if value.isdigit() else None


def check_resume_batch_size(model_dir: str, step: int, batch_size: int) -> None:
  """A resume must use the checkpoint's batch size: the saved data iterator holds batches of that size, and
  tf.data fails on the first one with a shape error (after config.gin was rewritten, before this check)."""
  # The config of the newest run that started at or before the checkpoint's step; config.gin for a
  # MODEL_DIR written before the history files.
  older = [path for start, _, path in history_configs(model_dir) if start <= step]
  path = older[-1] if older else fileio.join(model_dir, 'config.gin')
  if not fileio.exists(path):
    return
  recorded = _recorded_batch_size(path)
  if recorded is not None and recorded != batch_size:
    raise cli.UserError(f'BATCH_SIZE={batch_size} but checkpoint_{step} was trained with '
                        f'BATCH_SIZE={recorded} ({path}); resume with the same BATCH_SIZE or use a fresh MODEL_DIR.')


def check_resume_shapes(trainer: trainer_lib.Trainer, model_dir: str, step: int, train_ds: Any) -> None:
  """CheckpointShapeError (naming the parameters) if checkpoint_<step> holds another model, checked before
  config.gin is written; fit checks again when it restores."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  # Shapes from the pipeline's spec (training batches are full, so the batch axis is known): taking a real
  # batch would move the iterator before fit restores its position.
  trainer.prepare({k: np.zeros(spec.shape, spec.dtype.as_numpy_dtype)
                   for k, spec in train_ds.element_spec.items()})
  manager = ckpt_lib.CheckpointManager(model_dir, async_save=False)
  try:
    manager.check_shapes(step, trainer.abstract_state.params, trainer.abstract_state.opt_state)
  except ckpt_lib.CheckpointCorruptError:
    pass  # fit moves a damaged checkpoint aside and resumes from the one before
  finally:
    manager.close()


def write_model_info(model_dir: str, trainer: trainer_lib.Evaluator) -> None:
  """MODEL_DIR/model-info.txt: every parameter's shape, logical axes and sharding."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  shapes = ckpt_lib.flat_paths(trainer.abstract_params)
  axes = ckpt_lib.flat_paths(trainer.logical_axes)
  with fileio.open(fileio.join(model_dir, 'model-info.txt'), 'w') as f:
    f.write(f'mesh {dict(trainer.mesh.shape)}\n')
    total = 0
    for path, leaf in shapes.items():
      total += int(leaf.size)
      f.write(f'{path}  {tuple(leaf.shape)}  axes={tuple(axes.get(path, ()))}  '
              f'sharding={leaf.sharding.spec}\n')
    f.write(f'total parameters {total:,}\n')


# Registered only in the importable module: `python -m st_moe_jax.train` delegates to it (see the bottom),
# so the gin files' `import st_moe_jax.train` never registers a second copy from __main__.
if __name__ != '__main__':
  # print_fn is the caller's (train.main), never a binding: config.gin does not list it.
  train = gin.configurable('train', module='train_script', denylist=['print_fn'])(train)


def _main(flags: argparse.Namespace, print_fn: Optional[Callable[[str], None]] = None) -> None:
  del flags
  cli.call_configurable(functools.partial(train, print_fn=print_fn), 'train')
  # gin records a configurable's parameters when its call returns: now the operative config is complete.
  write_config(gin_setup.macro('MODEL_DIR'), gin.operative_config_str())


def main(argv: Optional[Sequence[str]] = None, *, print_fn: Optional[Callable[[str], None]] = None) -> None:
  """The command line (`python -m st_moe_jax.train ...`), also callable in-process with its flags as argv;
  print_fn receives the progress lines (default: print)."""
  cli.run_main(functools.partial(_main, print_fn=print_fn),
               'Train an ST-MoE model (t5x-style gin configuration).', argv)


if __name__ == '__main__':
  from st_moe_jax import train as _registered  # pylint: disable=g-import-not-at-top
  _registered.main()
