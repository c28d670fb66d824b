"""The router gin files select what they say: parsed on the tiny model, checked on the built configs."""

import pytest

from st_moe_jax import gin_setup

TINY = 'gin/models/st_moe_tiny.gin'
DECODER_ONLY = 'gin/runs/decoder_only.gin'


def _stacks(files):
  gin_setup.parse_model_gin(files)
  model = gin_setup.architecture()
  return model, [getattr(model, n) for n in ('encoder_moe', 'decoder_moe', 'moe') if hasattr(model, n)]


@pytest.mark.parametrize('files', [[TINY, 'gin/routers/sparsemixer.gin'],
                                   [TINY, DECODER_ONLY, 'gin/routers/sparsemixer.gin']])
def test_sparsemixer_gin_selects_dropless_sparsemixer_in_every_stack(files):
  _, stacks = _stacks(files)
  assert stacks and all(m.routing_method == 'sparsemixer' and m.dropless for m in stacks)
  assert all(m.sparsemixer_eps == 0.01 and m.num_selected_experts == 2 for m in stacks)


def test_lory_gin_selects_swiglu_experts_and_dense_ffns():
  model, (moe,) = _stacks([TINY, DECODER_ONLY, 'gin/routers/lory.gin'])
  assert moe.moe_type == 'lory'
  assert model.config.activations == ('silu', 'linear')
  assert moe.with_model_defaults(model.config.mlp_dim, model.config.activations).expert_activations == (
      'silu', 'linear')


def test_rmoe_gin_selects_the_recurrent_router():
  _, stacks = _stacks([TINY, 'gin/routers/rmoe.gin'])
  assert [m.router for m in stacks] == ['recurrent', 'recurrent']


def test_dropless_settings_are_reachable_from_gin():
  _, stacks = _stacks([TINY])
  assert all(not m.dropless for m in stacks)
  gin_setup.parse_model_gin([TINY], ['DROPLESS = True', 'DROPLESS_TILE_SIZE = 8',
                                     "GROUPED_MATMUL_METHOD = 'tiled'"])
  model = gin_setup.architecture()
  for moe in (model.encoder_moe, model.decoder_moe):
    assert (moe.dropless, moe.dropless_tile_size, moe.grouped_matmul_method) == (True, 8, 'tiled')


def test_group_multiple_is_reachable_from_gin():
  _, stacks = _stacks([TINY])
  assert all(m.group_multiple is None for m in stacks)  # flaxformer's rule by default
  gin_setup.parse_model_gin([TINY], ['GROUP_MULTIPLE = 1'])
  model = gin_setup.architecture()
  assert [m.group_multiple for m in (model.encoder_moe, model.decoder_moe)] == [1, 1]
