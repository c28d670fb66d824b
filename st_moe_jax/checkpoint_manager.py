"""Orbax checkpoints of a training run: save every N steps and at the end, keep the last K, async save,
resume from the latest, the data iterator's position saved beside the state, and fine-tuning from an
INITIAL_CHECKPOINT_PATH (parameters only, partial).

Layout (t5x-like names, orbax format):

  MODEL_DIR/checkpoint_<step>/
    params/      the parameters (orbax PyTree, one TensorStore array per leaf)
    opt_state/   the optimizer state
    dataset/     train_ds-<process>-of-<count>.*: each process's tf.data iterator (tf.train.Checkpoint)

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a crash mid-save
never leaves a half-written `checkpoint_<step>` behind. A checkpoint damaged later (a truncated chunk, a
deleted file) raises CheckpointCorruptError on restore; `move_aside` renames it to
checkpoint_<step>.corrupt-<time>, which orbax no longer lists, so the run resumes from the one before.
"""

import dataclasses
import logging
import os
import re
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from st_moe_jax import data as data_lib
from st_moe_jax import fileio

PyTree = Any
STEP_PREFIX = 'checkpoint'


class CheckpointShapeError(ValueError):
  """A checkpoint's parameters do not match the model (another model gin or other macros)."""


class ProcessCountError(FileNotFoundError):
  """A checkpoint has no data iterator state for this process (saved with another process count): a user
  error, never taken for a corrupt checkpoint."""


class DataPipelineMismatchError(CheckpointShapeError):
  """The checkpoint's data-iterator position was saved by another input pipeline (another task, settings
  or version of the preprocessing): the checkpoint is intact, its position cannot be restored."""


# A subclass of CheckpointShapeError only so that cli.run_main (which catches that one) prints it as a
# one-line error without a stack trace.
class CheckpointCorruptError(CheckpointShapeError):
  """A checkpoint's files are damaged or missing (not a model mismatch)."""

  def __init__(self, step: Optional[int], reason: str):
    super().__init__(reason if step is None else f'{STEP_PREFIX}_{step} is corrupt: {reason}')
    self.step = step
    self.reason = reason


def _first_in_chain(error: Optional[BaseException], kind: type) -> Optional[BaseException]:
  while error is not None:
    if isinstance(error, kind):
      return error
    error = error.__cause__ or error.__context__
  return None


def _root_cause(error: BaseException) -> str:
  """The innermost cause's first line (TensorStore's 'Error reading ... in OCDBT database at ...'), not the
  outer exception's spec dump."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines() or [type(error).__name__]
  return lines[0][:400]


# ---------------------------------------------------------------------------------------------------------
# The data iterator as an orbax item.

class DatasetHandler(ocp.CheckpointHandler):
  """Saves / restores this process's DataIterator in the checkpoint's `dataset/` directory."""

  def _prefix(self, directory: epath.Path) -> str:
    return fileio.join(os.fspath(directory),
                       data_lib.process_checkpoint_name(jax.process_index(), jax.process_count()))

  def save(self, directory: epath.Path, args: 'DatasetArgs') -> None:
    args.iterator.save(self._prefix(directory))

  def restore(self, directory: epath.Path, args: 'DatasetArgs') -> data_lib.DataIterator:
    prefix = self._prefix(directory)
    if not fileio.exists(prefix + '.index'):
      if not any(name.endswith('.index') for name in fileio.listdir(os.fspath(directory))):
        raise FileNotFoundError(f'{prefix}.index is missing')  # damaged: CheckpointCorruptError
      check_process_count(os.path.dirname(os.fspath(directory).rstrip('/')))
      raise ProcessCountError(f'{directory} holds no data iterator state for process {jax.process_index()} '
                              f'of {jax.process_count()}.')
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      args.iterator.restore(prefix)
    except tf.errors.NotFoundError as e:
      if 'Failed to restore dataset iterator' not in str(e):
        raise
      checkpoint = os.path.dirname(os.fspath(directory).rstrip('/'))
      raise DataPipelineMismatchError(
          f'{checkpoint}: its data position was saved by another input pipeline '
          '(another task or TASK_FEATURE_LENGTHS, or a version of st_moe_jax before training mixed segments '
          'across files); its parameters are intact. Resume with the settings and version that wrote it, or '
          f'continue in a fresh MODEL_DIR with --gin.INITIAL_CHECKPOINT_PATH="\'{checkpoint}\'" (its '
          'parameters and step; fresh optimizer state and data order).') from e
    return args.iterator

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DatasetHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class DatasetArgs(ocp.args.CheckpointArgs):
  iterator: data_lib.DataIterator


def saved_process_count(checkpoint_dir: str) -> Optional[int]:
  """How many processes saved checkpoint_dir's data iterator (dataset/train_ds-<i>-of-<n>.index); None
  without one."""
  dataset = fileio.join(checkpoint_dir, 'dataset')
  if not fileio.isdir(dataset):
    return None
  counts = {int(m.group(1)) for name in fileio.listdir(dataset)
            if (m := re.fullmatch(r'train_ds-\d+-of-(\d+)\.index', name))}
  return max(counts) if counts else None


def check_process_count(checkpoint_dir: str) -> None:
  """ProcessCountError naming both counts when checkpoint_dir was saved by another number of processes:
  each process saved its own shard's data position, which another process count cannot continue (a
  silent restart of the data would repeat examples)."""
  saved, current = saved_process_count(checkpoint_dir), jax.process_count()
  if saved is not None and saved != current:
    raise ProcessCountError(
        f'{checkpoint_dir} was saved by {saved} processes but this run has {current} (its data position is '
        f'per process): resume with {saved} processes (--process_count={saved}, e.g. scripts/launch_local.sh '
        f'{saved} ...), or continue in a fresh MODEL_DIR with --gin.INITIAL_CHECKPOINT_PATH="\'{checkpoint_dir}'
        '\'" (its parameters and step; fresh optimizer state and data order).')


# ---------------------------------------------------------------------------------------------------------
# Shape checks.

def flat_paths(tree: PyTree) -> dict[str, Any]:
  """{'decoder/layers_0/mlp/wo/kernel': leaf, ...}: a tree's leaves by '/'-joined path."""
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shape_differences(saved: PyTree, expected: PyTree) -> tuple[list[str], list[str], list[str]]:
  """(mismatched, missing_in_checkpoint, only_in_checkpoint) parameter paths; leaves need `.shape`.

  mismatched entries read 'path: checkpoint (a, b) vs model (c, d)'.
  """
  saved, expected = flat_paths(saved), flat_paths(expected)
  mismatched = [f'{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}'
                for k, v in expected.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
  missing = [k for k in expected if k not in saved]
  extra = [k for k in saved if k not in expected]
  return mismatched, missing, extra


def saved_param_shapes(params_dir: str) -> PyTree:
  """The tree of ArrayMetadata (with .shape) saved in a checkpoint's params/ directory."""
  metadata = ocp.PyTreeCheckpointer().metadata(params_dir)
  metadata = getattr(metadata, 'item_metadata', metadata)
  return getattr(metadata, 'tree', metadata)


def _readable_shapes(item_dir: str, step: int) -> PyTree:
  """saved_param_shapes, or CheckpointCorruptError when the item's index cannot be read or lists no array
  (a truncated OCDBT file reads as an empty tree, which would look like a model of another shape)."""
  try:
    saved = saved_param_shapes(item_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptError(step, f'{item_dir}: {_root_cause(e)}') from e
  if not jax.tree.leaves(saved, is_leaf=lambda x: hasattr(x, 'shape')):
    raise CheckpointCorruptError(step, f'{item_dir} lists no readable array (its index is damaged)')
  return saved


def _shape_problems(item_dir: str, expected: PyTree, what: str, step: int) -> str:
  """'' if the tree saved in item_dir has the expected leaves and shapes, else what differs, listed."""
  mismatched, missing, extra = shape_differences(_readable_shapes(item_dir, step), expected)
  parts = []
  if mismatched:
    parts.append(f'{len(mismatched)} {what} with other shapes:{_listing(mismatched)}')
  if missing:
    parts.append(f'{len(missing)} {what} missing from the checkpoint:{_listing(missing)}')
  if extra:
    parts.append(f'{len(extra)} checkpoint {what} not expected here:{_listing(extra)}')
  return '; '.join(parts)


def _listing(names: list[str], limit: int = 12) -> str:
  shown = '\n  '.join(names[:limit])
  more = f'\n  ... and {len(names) - limit} more' if len(names) > limit else ''
  return f'\n  {shown}{more}'


# ---------------------------------------------------------------------------------------------------------
# The manager.

class CheckpointManager:
  """Save / resume for one MODEL_DIR.

  Args:
    model_dir: MODEL_DIR; checkpoints go to MODEL_DIR/checkpoint_<step>.
    period: save every `period` steps (and whenever `save(..., force=True)`, e.g. at the end).
    keep: keep the last `keep` checkpoints (None: all).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, model_dir: str, period: int = 1000, keep: Optional[int] = None,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, step_prefix=STEP_PREFIX,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        epath.Path(fileio.absolute(model_dir)), options=options,
        item_handlers={'params': ocp.PyTreeCheckpointHandler(), 'opt_state': ocp.PyTreeCheckpointHandler(),
                       'dataset': DatasetHandler()})
    self.directory = os.fspath(self._manager.directory)
    self.period = max(period, 1)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.period == 0

  def save(self, step: int, params: PyTree, opt_state: PyTree,
           data_iterator: Optional[data_lib.DataIterator] = None, force: bool = False) -> bool:
    """Starts saving checkpoint_<step> if the period says so (or force); True if a save started."""
    items = {'params': ocp.args.PyTreeSave(params), 'opt_state': ocp.args.PyTreeSave(opt_state)}
    if data_iterator is not None:
      items['dataset'] = DatasetArgs(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def check_shapes(self, step: int, abstract_params: PyTree, abstract_opt_state: Optional[PyTree] = None
                   ) -> None:
    """Raises CheckpointShapeError listing every parameter (then optimizer-state leaf) whose shape or
    presence differs from what this model and optimizer expect."""
    checkpoint = f'{self.directory}/{STEP_PREFIX}_{step}'
    # Without its tree metadata an item reads as empty, which would look like a model of another shape.
    for item in ('params',) if abstract_opt_state is None else ('params', 'opt_state'):
      if not fileio.exists(fileio.join(checkpoint, item, '_METADATA')):
        raise CheckpointCorruptError(step, f'{checkpoint}/{item}/_METADATA is missing')
    problems = _shape_problems(fileio.join(checkpoint, 'params'), abstract_params, 'parameters', step)
    if problems:
      raise CheckpointShapeError(
          f'The checkpoint {checkpoint} was written by a model of another shape: {problems}\nUse the model '
          'gin file and macros (NUM_EXPERTS, EMBED_DIM, ...) the checkpoint was trained with, or a fresh '
          'MODEL_DIR.')
    if abstract_opt_state is None:
      return
    problems = _shape_problems(fileio.join(checkpoint, 'opt_state'), abstract_opt_state,
                               'optimizer-state entries', step)
    if problems:
      raise CheckpointShapeError(
          f'The checkpoint {checkpoint} holds optimizer state of another layout than this optimizer: '
          f'{problems}\nIts parameters fit this model. Checkpoints written before Adafactor factored by '
          'logical axis names (t5x rules) keep full second moments for attention and small expert kernels. '
          'To continue from it, train in a fresh MODEL_DIR with --gin.INITIAL_CHECKPOINT_PATH="\'' 
          f'{checkpoint}\'" (its parameters and step, a fresh optimizer state, the learning-rate schedule '
          'continued).')

  def restore(self, step: int, abstract_params: PyTree, abstract_opt_state: PyTree,
              data_iterator: Optional[data_lib.DataIterator] = None) -> tuple[PyTree, PyTree]:
    """(params, opt_state) of checkpoint_<step>, placed as the abstract trees' shardings say; restores
    the data iterator's position too when given one.

    abstract_*: jax.ShapeDtypeStruct trees with `sharding` set.
    """
    self.check_shapes(step, abstract_params, abstract_opt_state)
    items = {'params': _pytree_restore(abstract_params), 'opt_state': _pytree_restore(abstract_opt_state)}
    if data_iterator is not None:
      items['dataset'] = DatasetArgs(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      if _first_in_chain(e, ProcessCountError) is not None:
        raise
      mismatch = _first_in_chain(e, DataPipelineMismatchError)
      if mismatch is not None:
        raise mismatch from None
      raise CheckpointCorruptError(step, _root_cause(e)) from e
    return restored['params'], restored['opt_state']

  def move_aside(self, step: int) -> str:
    """Renames checkpoint_<step> to checkpoint_<step>.corrupt-<UTC time> (never deletes it: the user may
    want to inspect or repair it) and makes orbax forget the step; returns the new path."""
    source = fileio.join(self.directory, f'{STEP_PREFIX}_{step}')
    target = f'{source}.corrupt-{time.strftime("%Y%m%dT%H%M%S", time.gmtime())}'
    if jax.process_index() == 0:
      fileio.rename(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'move_aside_{step}')
    self._manager.reload()
    return target

  def reached_preemption(self, step: int) -> bool:
    """True at the step all processes agreed to save at after one of them got a preemption notice (JAX's
    preemption sync manager, multi-process runs started with jax.distributed); False otherwise."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _pytree_restore(abstract: PyTree, partial: bool = False) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                partial_restore=partial)


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning: parameters from another run.

def resolve_checkpoint_dir(path: str) -> str:
  """A checkpoint_<step> directory: `path` itself, or the latest one inside a MODEL_DIR."""
  path = fileio.absolute(path)
  if not fileio.isdir(path):
    raise FileNotFoundError(f'Checkpoint path {path} does not exist (INITIAL_CHECKPOINT_PATH / '
                            'CHECKPOINT_PATH must name a checkpoint_<step> directory or a MODEL_DIR).')
  if fileio.isdir(fileio.join(path, 'params')):
    return path
  steps = [int(m.group(1)) for name in fileio.listdir(path)
           if (m := re.fullmatch(rf'{STEP_PREFIX}_(\d+)', name)) and fileio.isdir(fileio.join(path, name))]
  if not steps:
    raise FileNotFoundError(f'No {STEP_PREFIX}_<step> directory in {path}; INITIAL_CHECKPOINT_PATH / '
                            'CHECKPOINT_PATH must name a checkpoint or a MODEL_DIR holding checkpoints.')
  return fileio.join(path, f'{STEP_PREFIX}_{max(steps)}')


def latest_checkpoint_step(model_dir: str) -> Optional[int]:
  """The step of MODEL_DIR's latest checkpoint_<step>, or None if it has none (or does not exist)."""
  try:
    return checkpoint_step(resolve_checkpoint_dir(model_dir))
  except FileNotFoundError:
    return None


def checkpoint_step(path: str) -> int:
  match = re.search(rf'{STEP_PREFIX}_(\d+)$', path.rstrip('/'))
  return int(match.group(1)) if match else 0


def restore_params(path: str, abstract_params: PyTree, *, partial: bool = False
                   ) -> tuple[PyTree, list[str]]:
  """Parameters from the checkpoint at `path` (a checkpoint dir or a MODEL_DIR: its latest checkpoint).

  Args:
    abstract_params: the model's parameters as jax.ShapeDtypeStruct with shardings.
    partial: fine-tuning: restore the parameters the checkpoint has and leave the others out (the caller
      initialises them); a parameter with another shape is still an error.

  Returns:
    (params, missing): with partial=True params holds only the restored leaves (a dict tree) and missing
    lists the '/'-paths the checkpoint did not have; with partial=False missing is [].

  Raises:
    CheckpointShapeError naming the mismatched parameters.
  """
  directory = resolve_checkpoint_dir(path)
  saved = saved_param_shapes(fileio.join(directory, 'params'))
  mismatched, missing, extra = shape_differences(saved, abstract_params)
  if mismatched or (not partial and (missing or extra)):
    raise CheckpointShapeError(
        f'The checkpoint {directory} does not fit this model: '
        + (f'{len(mismatched)} parameters with other shapes:{_listing(mismatched)}' if mismatched else '')
        + (f' {len(missing)} missing:{_listing(missing)}' if missing and not partial else '')
        + (f' {len(extra)} unexpected:{_listing(extra)}' if extra and not partial else '')
        + '\nUse the model gin file and macros the checkpoint was trained with.')
  if extra:
    logging.info('Ignoring %d checkpoint parameters the model does not have: %s', len(extra), extra[:8])
  target = abstract_params
  if partial:
    missing_set = set(missing)
    target = _subtree(abstract_params, lambda p: p not in missing_set)
  restored = ocp.PyTreeCheckpointer().restore(
      fileio.join(directory, 'params'), args=_pytree_restore(target, partial=partial))
  return restored, missing


def _subtree(tree: PyTree, keep) -> dict:
  """The nested-dict subtree of `tree` whose '/'-paths satisfy keep(path)."""
  out: dict = {}
  for path, leaf in flat_paths(tree).items():
    if keep(path):
      node = out
      *parents, name = path.split('/')
      for p in parents:
        node = node.setdefault(p, {})
      node[name] = leaf
  return out


def merge_params(initialised: PyTree, restored: dict) -> PyTree:
  """`initialised` with every leaf present in `restored` (same '/'-path) replaced by the restored one."""
  flat = flat_paths(restored)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: flat.get('/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path), leaf),
      initialised)


def to_numpy(tree: PyTree) -> PyTree:
  return jax.tree.map(np.asarray, tree)
