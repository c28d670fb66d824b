"""Dense building blocks, with flaxformer parameter names and logical axis names."""

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
DType = jnp.dtype

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'gelu': nn.gelu,  # tanh approximation, as T5 1.1's gated-gelu
    'relu': nn.relu,
    'silu': nn.silu,
    'linear': lambda x: x,
}

# flaxformer's MLP kernel init: truncated normal scaled by fan-in.
default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


class Dense(nn.Module):
  """y = x · kernel, no bias, with a float32 kernel [in, out] carrying logical axis names."""
  features: int
  axes: tuple[str, str] = ('embed', 'mlp')
  dtype: DType = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (inputs.shape[-1], self.features), jnp.float32)
    return jnp.dot(inputs.astype(self.dtype), kernel.astype(self.dtype))


class MlpBlock(nn.Module):
  """Transformer feed-forward block: wo(dropout(∏_i act_i(wi_i x))).

  ('gelu', 'linear') is GEGLU with kernels wi_0, wi_1, wo; ('relu',) is the classic T5 / Switch FFN with
  wi, wo. Used as the dense FFN and, vmapped over the 'expert' axis, as the MoE experts.

  Attributes:
    intermediate_dim: F.
    activations: one name per input projection, multiplied together.
    intermediate_dropout_rate: dropout on the hidden activations (expert dropout for experts).
    dtype: computation dtype; parameters stay float32.
    input_axis_name / intermediate_axis_name: logical axes of the kernels ('embed', 'mlp' for the dense
      FFN; 'mlp_embed', 'expert_mlp' for experts).
  """
  intermediate_dim: int
  activations: Sequence[str] = ('gelu', 'linear')
  intermediate_dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  kernel_init: Callable = default_kernel_init
  input_axis_name: str = 'embed'
  intermediate_axis_name: str = 'mlp'

  @nn.compact
  def __call__(self, inputs: Array, *, enable_dropout: bool = False) -> Array:
    """inputs: <float>[..., H] -> <float>[..., H] in self.dtype."""
    for name in self.activations:
      if name not in ACTIVATIONS:
        raise ValueError(f'Unknown activation {name!r} in MlpBlock.activations; choose from '
                         f'{sorted(ACTIVATIONS)}.')
    axes = (self.input_axis_name, self.intermediate_axis_name)
    names = ['wi'] if len(self.activations) == 1 else [f'wi_{i}' for i in range(len(self.activations))]
    hidden = None
    for name, act in zip(names, self.activations):
      h = Dense(self.intermediate_dim, axes, self.dtype, self.kernel_init, name=name)(inputs)
      h = ACTIVATIONS[act](h)
      hidden = h if hidden is None else hidden * h
    hidden = nn.Dropout(rate=self.intermediate_dropout_rate)(hidden, deterministic=not enable_dropout)
    return Dense(inputs.shape[-1], axes[::-1], self.dtype, self.kernel_init, name='wo')(hidden)
