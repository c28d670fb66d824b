"""The ('data', 'expert', 'model') device mesh, logical axis rules, and shardings (docs/routing.md §10).

Model code names only logical axes; this module is the one place they meet mesh axes. Batches are split
over ('expert', 'data') together, expert parameters over 'expert', mlp / heads / vocab over 'model'. Under
`jax.jit` with these shardings XLA places the all-to-all between token groups and expert buffers.

Typical use:

  mesh = create_mesh(num_expert_partitions=NUM_EXPERT_PARTITIONS, num_model_partitions=NUM_MODEL_PARTITIONS)
  rules = standard_logical_axis_rules()
  with activate(mesh, rules):  # MoeLayer's with_logical_constraint calls need both, at trace time
    step = jax.jit(train_step, in_shardings=(param_sh, opt_sh, batch_shardings(batch, mesh)), ...)
"""

import contextlib
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
LogicalRules = Sequence[tuple[str, Any]]

MESH_AXES = ('data', 'expert', 'model')
BATCH_MESH_AXES = ('expert', 'data')


def standard_logical_axis_rules() -> list[tuple[str, Any]]:
  """Logical axis → mesh axis, in priority order (t5x's 1-D rules plus MoePjitPartitioner's additions)."""
  return [
      ('batch', BATCH_MESH_AXES),
      ('expert', 'expert'),
      ('expert_replicas', 'data'),
      ('expert_mlp', 'model'),
      ('mlp', 'model'),
      ('heads', 'model'),
      ('joined_kv', 'model'),
      ('vocab', 'model'),
      ('embed', None),
      ('mlp_embed', None),
      ('length', None),
      ('kv', None),
      ('unmodeled', None),
      ('relpos_buckets', None),
      ('abspos_buckets', None),
      ('layers', None),
      ('stack', None),
  ]


# ---------------------------------------------------------------------------------------------------------
# Mesh.

def mesh_shape(num_devices: int, num_expert_partitions: int = 1,
               num_model_partitions: int = 1) -> tuple[int, int, int]:
  """(data, expert, model) sizes for D devices and m = num_model_partitions.

  model = m; expert = the largest divisor of D/m that is ≤ num_expert_partitions (an upper bound, as in
  t5x's MoePjitPartitioner); data = D / (m · expert).

  Raises:
    ValueError naming NUM_MODEL_PARTITIONS / NUM_EXPERT_PARTITIONS when they cannot fit the devices.
  """
  if num_model_partitions < 1 or num_devices % num_model_partitions:
    raise ValueError(f'NUM_MODEL_PARTITIONS={num_model_partitions} must be >= 1 and divide the number of '
                     f'devices ({num_devices}); choose one of {_divisors(num_devices)}.')
  if num_expert_partitions < 1:
    raise ValueError(f'NUM_EXPERT_PARTITIONS must be >= 1, got {num_expert_partitions}.')
  replicas = num_devices // num_model_partitions
  expert = max(d for d in _divisors(replicas) if d <= num_expert_partitions)
  return replicas // expert, expert, num_model_partitions


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def create_mesh(devices: Optional[Sequence[jax.Device]] = None, num_expert_partitions: int = 1,
                num_model_partitions: int = 1) -> Mesh:
  """A Mesh with axes ('data', 'expert', 'model') over `devices` (default: all of jax.devices()).

  The model axis varies fastest, so model-parallel partners are neighbouring devices (on one host where
  possible); experts come next, then data.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(len(devices), num_expert_partitions, num_model_partitions)
  try:  # topology-aware order on TPU / GPU
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Optional[LogicalRules] = None):
  """Context for tracing model code: the mesh and the logical axis rules.

  Without both, flax's with_logical_constraint is a silent no-op and activations are left to XLA.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules or standard_logical_axis_rules()):
    yield


def num_expert_replicas(mesh: Mesh) -> int:
  """devices ÷ (expert partitions × model partitions): MoeConfig.num_expert_replicas (docs/routing.md §5)."""
  return max(mesh.shape['data'], 1)


# ---------------------------------------------------------------------------------------------------------
# Validation with errors that say what to change.

def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """The batch is split over the data × expert axes: BATCH_SIZE must be a multiple of their product."""
  shards = mesh.shape['data'] * mesh.shape['expert']
  if batch_size % shards:
    raise ValueError(
        f'BATCH_SIZE={batch_size} is not divisible by the data x expert mesh axes '
        f'(data={mesh.shape["data"]} x expert={mesh.shape["expert"]} = {shards}). '
        f'Use a multiple of {shards}, e.g. {max(shards, batch_size // shards * shards)}, or change NUM_EXPERT_PARTITIONS / '
        f'NUM_MODEL_PARTITIONS.')


def check_num_experts(num_experts: int, num_expert_partitions: int, mesh: Optional[Mesh] = None) -> None:
  """Experts are split evenly over the expert axis: NUM_EXPERTS must be a multiple of it."""
  if num_experts % num_expert_partitions:
    raise ValueError(f'NUM_EXPERTS={num_experts} is not divisible by NUM_EXPERT_PARTITIONS='
                     f'{num_expert_partitions}. Set NUM_EXPERT_PARTITIONS to a divisor of NUM_EXPERTS, '
                     f'e.g. {math.gcd(num_experts, num_expert_partitions)}.')
  if mesh is not None and num_experts % mesh.shape['expert']:
    raise ValueError(f'NUM_EXPERTS={num_experts} is not divisible by the mesh expert axis '
                     f'({mesh.shape["expert"]}, the largest divisor of devices / NUM_MODEL_PARTITIONS that '
                     f'is <= NUM_EXPERT_PARTITIONS={num_expert_partitions}). Choose NUM_EXPERT_PARTITIONS '
                     f'dividing both NUM_EXPERTS and the device count.')


# ---------------------------------------------------------------------------------------------------------
# Shardings.

def logical_axes(boxed: PyTree) -> PyTree:
  """Logical PartitionSpec of every parameter from its nn.LogicallyPartitioned metadata (P() if none)."""
  return nn.get_partition_spec(boxed)


def param_shardings(boxed_params: PyTree, mesh: Mesh, rules: Optional[LogicalRules] = None) -> PyTree:
  """NamedSharding per parameter from its logical axes.

  Args:
    boxed_params: parameters with LogicallyPartitioned leaves, e.g. `jax.eval_shape(model.init, ...)`
      (no memory is allocated for abstract ones).
  Returns:
    The unboxed parameter tree with a NamedSharding per leaf; e.g. an expert kernel
    ('expert', 'mlp_embed', 'expert_mlp') gets P('expert', None, 'model').
  """
  return nn.logical_to_mesh_sharding(logical_axes(boxed_params), mesh,
                                     rules or standard_logical_axis_rules())


def _key_tuple(path) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path)


def _derived_spec(shape: Sequence[int], param_shape: Sequence[int], spec: P) -> P:
  """The spec of an optimizer statistic of a parameter: same-size axes keep the parameter's mesh axis,
  reduced (size-1) axes are replicated; a statistic of another rank is replicated."""
  if len(shape) != len(param_shape):
    return P()
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  return P(*(axis if n == m else None for n, m, axis in zip(shape, param_shape, spec)))


def opt_state_shardings(opt_state: PyTree, params: PyTree, shardings: PyTree) -> PyTree:
  """NamedSharding per optimizer-state leaf, taken from the parameters' shardings.

  Works for any optax chain whose per-parameter state mirrors the parameter tree (Adafactor's keepdims
  statistics, momentum, multi_transform / masked states): a state leaf belongs to the parameter whose
  path is the longest suffix of its own path. Same-size axes keep the parameter's mesh axis, so
  Adafactor's v_row [E, H, 1] of an expert kernel P('expert', None, 'model') is P('expert', None, None).
  Leaves of no parameter (step counts) are replicated.

  Args:
    opt_state: the state or its abstract version (`jax.eval_shape(tx.init, params)`).
    params: the (unboxed, possibly abstract) parameters the state was built from.
    shardings: their NamedShardings (`param_shardings`).
  """
  flat_params = {_key_tuple(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  flat_shardings = {_key_tuple(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(shardings)}
  mesh = next(iter(flat_shardings.values())).mesh

  def sharding(path, leaf):
    keys = _key_tuple(path)
    for start in range(len(keys)):
      suffix = keys[start:]
      if suffix in flat_params:
        param_sharding = flat_shardings[suffix]
        return NamedSharding(mesh, _derived_spec(np.shape(leaf), np.shape(flat_params[suffix]),
                                                 param_sharding.spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(sharding, opt_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over ('expert', 'data'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_MESH_AXES))


def batch_shardings(batch: PyTree, mesh: Mesh) -> PyTree:
  """A batch_sharding for every feature of a batch, after checking the batch size divides the axes."""
  for leaf in jax.tree.leaves(batch):
    check_batch_size(np.shape(leaf)[0], mesh)
  return jax.tree.map(lambda _: batch_sharding(mesh), batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
