"""RMoE's layerwise recurrent router: the GRU cell, gradient through depth, parameter count, model wiring."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import decoding, models, routing
from st_moe_jax.routers import RecurrentRouter, RecurrentRouterCell

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = models.TransformerConfig(vocab_size=40, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                                  num_encoder_layers=2, num_decoder_layers=2)
P = 8  # GRU size
# Every decoder layer sparse (2 MoE layers in depth order); eval capacity factor E: nothing is dropped.
RMOE = models.MoeConfig(num_sparse_layers=2, num_experts=4, expert_mlp_dim=20, router='recurrent',
                        recurrent_router_dim=P, eval_capacity_factor=4.0, min_expert_capacity=1)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_gru_cell_is_torch_grucell():
  """The reset-after GRU (torch.nn.GRUCell, gate order r, z, n) on explicit weights, computed by hand."""
  p = 2
  x = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
  h = np.array([[0.1, 0.2], [-0.3, 0.4]], np.float32)
  w_i = np.arange(12, dtype=np.float32).reshape(2, 6) / 10 - 0.5  # [p, 3p]: columns r | z | n
  w_h = np.arange(12, dtype=np.float32)[::-1].reshape(2, 6) / 20 - 0.2
  b_i = np.array([0.1, -0.1, 0.2, 0.0, 0.3, -0.2], np.float32)
  b_h = np.array([0.0, 0.05, -0.05, 0.1, 0.0, 0.2], np.float32)
  params = {'input_kernel': w_i, 'hidden_kernel': w_h, 'input_bias': b_i, 'hidden_bias': b_h}
  out = RecurrentRouterCell(p).apply({'params': params}, x, h)
  gi, gh = x @ w_i + b_i, h @ w_h + b_h
  r = _sigmoid(gi[:, :2] + gh[:, :2])
  u = _sigmoid(gi[:, 2:4] + gh[:, 2:4])
  n = np.tanh(gi[:, 4:] + r * gh[:, 4:])
  np.testing.assert_allclose(out, (1 - u) * n + u * h, rtol=1e-6, atol=1e-6)
  rnn = RecurrentRouterCell(p, cell='rnn').apply(
      {'params': {'input_kernel': w_i[:, 4:], 'hidden_kernel': w_h[:, 4:], 'input_bias': b_i[4:],
                  'hidden_bias': b_h[4:]}}, x, h)
  np.testing.assert_allclose(rnn, np.tanh(gi[:, 4:] + gh[:, 4:]), rtol=1e-6, atol=1e-6)


class _ThreeLayerRouters(nn.Module):
  """Three RecurrentRouters sharing one cell, as a stack wires them; returns each layer's logits."""
  state_mode: str = 'pass'

  @nn.compact
  def __call__(self, xs):
    cell = RecurrentRouterCell(P, name='router')
    state, out = None, []
    for i, x in enumerate(xs):
      logits, state = RecurrentRouter(4, cell, state_mode=self.state_mode, name=f'layers_{i}')(x, state)
      out.append(logits)
    return out


@pytest.mark.parametrize('state_mode,flows', [('pass', True), ('detach', False), ('none', False)])
def test_higher_routing_trains_lower_router_through_the_state(state_mode, flows):
  """d(z-loss of layer 3) / d(P_1) is non-zero only through the un-detached state (inputs held fixed)."""
  xs = [jax.random.normal(jax.random.PRNGKey(i), (2, 5, 16)) for i in range(3)]
  module = _ThreeLayerRouters(state_mode)
  params = module.init(jax.random.PRNGKey(0), xs)['params']
  grads = jax.jit(jax.grad(lambda p: routing.router_z_loss(module.apply({'params': p}, xs)[2])))(params)
  lower = nn.unbox(grads)['layers_0']['input_projection']['kernel']
  assert (float(jnp.abs(lower).max()) > 1e-8) == flows
  assert float(jnp.abs(nn.unbox(grads)['router']['input_kernel']).max()) > 0  # the shared cell always learns


@pytest.fixture(scope='module')
def lm():
  model = models.DecoderOnly(CONFIG, RMOE)
  tokens = jnp.zeros((3, 6), jnp.int32)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(1), tokens, tokens, enable_dropout=False))()['params']
  return model, params


def _router_param_count(params) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(int(np.prod(x.shape)) for path, x in leaves
             if any(getattr(k, 'key', None) == 'router' for k in path))


def rmoe_router_params(num_moe_layers, hidden, experts, p):
  """The RMoE paper's count: per MoE layer P_l [p, H] + G_l [E, p]; one shared GRU: 6p² + 6p."""
  return num_moe_layers * p * (hidden + experts) + 6 * p * p + 6 * p


def test_router_param_count_follows_the_paper():
  tokens = jnp.zeros((1, 4), jnp.int32)
  model = models.DecoderOnly(CONFIG, RMOE)
  params = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens,
                                                      enable_dropout=False))['params'])
  assert _router_param_count(params) == rmoe_router_params(2, 16, 4, P)  # 2·8·20 + 6·64 + 48 = 752
  assert set(params['decoder']['router']) == {'input_kernel', 'hidden_kernel', 'input_bias', 'hidden_bias'}
  # The paper's enwiki8 model (Table 1): 8 MoE layers, hidden 352, 16 experts, p = 128 → 475,904 router
  # parameters ("0.47M", against 8·352·16 = 45,056 = "0.04M" for linear routers). Shapes only.
  paper = models.TransformerConfig(vocab_size=256, embed_dim=352, num_heads=8, head_dim=44, mlp_dim=352,
                                   num_decoder_layers=8)
  moe = models.MoeConfig(num_sparse_layers=8, num_experts=16, router='recurrent', recurrent_router_dim=128)
  for router, expected in (('recurrent', 475_904), ('linear', 45_056)):
    model = models.DecoderOnly(paper, models.MoeConfig(**{**moe.__dict__, 'router': router}))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False))
    assert _router_param_count(nn.unbox(shapes['params'])) == expected
  assert rmoe_router_params(8, 352, 16, 128) == 475_904


def test_encoder_decoder_one_cell_per_stack_and_gradient_from_the_top_routing():
  """Each stack has its own cell; the decoder's top MoE layer's z-loss trains the lower layer's router."""
  config = models.TransformerConfig(**{**CONFIG.__dict__, 'num_encoder_layers': 1})
  model = models.EncoderDecoder(config, models.MoeConfig(**{**RMOE.__dict__, 'num_sparse_layers': 1}), RMOE)
  enc = jnp.array([[5, 6, 7, 0]], jnp.int32)
  dec = jnp.array([[0, 8, 9, 10]], jnp.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec, dec,
                                                      enable_dropout=False))['params'])
  assert 'router' in shapes['encoder'] and 'router' in shapes['decoder']
  assert 'router' in shapes['decoder']['layers_0'] and 'router' in shapes['encoder']['layers_0']
  assert 'router' not in shapes['decoder']['layers_1']['mlp']  # logits come from outside MoeLayer

  @jax.jit
  def grads():
    params = model.init(jax.random.PRNGKey(0), enc, dec, dec, enable_dropout=False)['params']

    def top_z_loss(p):
      _, state = model.apply({'params': p}, enc, dec, dec, enable_dropout=False, mutable=['intermediates'])
      return state['intermediates']['decoder']['layers_1']['mlp']['router_z_loss'][0]
    return jax.grad(top_z_loss)(params)

  g = nn.unbox(grads())
  for leaf in (g['decoder']['layers_0']['router']['input_projection']['kernel'],  # the lower layer's P_l
               g['decoder']['router']['input_kernel'], g['encoder']['router']['input_kernel']):
    assert float(jnp.abs(leaf).max()) > 0


def test_cached_decoding_equals_recompute(lm):
  """RMoE routes each token on its own state through depth, so decode steps route exactly as a full pass."""
  model, params = lm
  length = 6
  prompt = np.array([[5, 6, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [8, 9, 10, 0, 0, 0]], np.int32)
  tokens, _ = decoding.generate(model, params, max_decode_length=length, prompt=prompt)
  apply = jax.jit(lambda d_in, d_t: model.apply({'params': params}, d_in, d_t, enable_dropout=False))
  out = np.zeros_like(prompt)
  for i in range(length):  # greedy by recomputing the whole prefix
    dec_in = np.concatenate([np.zeros((3, 1), np.int32), out[:, :-1]], 1)
    targets = np.where(np.arange(length)[None] <= i, np.maximum(out, 1), 0)
    step = np.asarray(apply(dec_in, targets))[:, i].argmax(-1)
    out[:, i] = np.where(prompt[:, i] != 0, prompt[:, i], step)
    out[:, i] = np.where((out[:, :i] == 1).any(1), 0, out[:, i])
  np.testing.assert_array_equal(tokens, out)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='MoeConfig.router'):
    models.MoeConfig(router='hyper')
  with pytest.raises(ValueError, match='recurrent_router_state'):
    models.MoeConfig(recurrent_router_state='frozen')
  with pytest.raises(ValueError, match='recurrent_router_dim'):
    models.MoeConfig(recurrent_router_dim=0)


def test_gin_rmoe_file(monkeypatch):
  gin_setup = pytest.importorskip('st_moe_jax.gin_setup')
  monkeypatch.chdir(REPO)
  gin_setup.parse_model_gin(['gin/models/st_moe_tiny.gin', 'gin/routers/rmoe.gin'],
                            ['RECURRENT_ROUTER_DIM = 16'], search_paths=[REPO])
  model = gin_setup.architecture()
  assert model.encoder_moe.router == 'recurrent' and model.decoder_moe.router == 'recurrent'
  assert model.decoder_moe.recurrent_router_dim == 16
  tokens = jnp.ones((2, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))
  assert nn.unbox(shapes['params'])['decoder']['router']['hidden_kernel'].shape == (16, 48)
