"""RMoE's layerwise recurrent router: the GRU cell, gradient through depth, parameter count, model wiring."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import decoding, gin_setup, models, routing
from st_moe_jax.routers import RecurrentRouter, RecurrentRouterCell

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = models.TransformerConfig(vocab_size=40, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                                  num_encoder_layers=2, num_decoder_layers=2)
P = 8  # GRU size
# Every decoder layer sparse (2 MoE layers in depth order); eval capacity factor E: nothing is dropped.
RMOE = models.MoeConfig(num_sparse_layers=2, num_experts=4, expert_mlp_dim=20, router='recurrent',
                        recurrent_router_dim=P, eval_capacity_factor=4.0, min_expert_capacity=1)


def _torch_cell(jax_params, cell):
  """torch.nn.GRUCell / RNNCell (tanh) holding the JAX cell's weights: torch's [out, in] = our kernelᵀ."""
  torch = pytest.importorskip('torch')
  p = jax_params['input_kernel'].shape[0]
  module = torch.nn.GRUCell(p, p) if cell == 'gru' else torch.nn.RNNCell(p, p, nonlinearity='tanh')
  with torch.no_grad():
    module.weight_ih.copy_(torch.tensor(np.asarray(jax_params['input_kernel']).T))
    module.weight_hh.copy_(torch.tensor(np.asarray(jax_params['hidden_kernel']).T))
    module.bias_ih.copy_(torch.tensor(np.asarray(jax_params['input_bias'])))
    module.bias_hh.copy_(torch.tensor(np.asarray(jax_params['hidden_bias'])))
  return lambda x, h: module(torch.tensor(np.asarray(x)), torch.tensor(np.asarray(h))).detach().numpy()


@pytest.mark.parametrize('cell', ['gru', 'rnn'])
def test_cell_is_torchs_grucell_or_rnncell(cell):
  """RecurrentRouterCell with random weights (biases too) against torch.nn.GRUCell (reset-after, gates
  r, z, n) and, for the 'rnn' ablation, torch.nn.RNNCell(tanh), both given the same weights."""
  p, n = 5, 7
  rows = 3 if cell == 'gru' else 1
  rng = np.random.default_rng(0)
  params = {'input_kernel': rng.normal(size=(p, rows * p)), 'hidden_kernel': rng.normal(size=(p, rows * p)),
            'input_bias': rng.normal(size=(rows * p,)), 'hidden_bias': rng.normal(size=(rows * p,))}
  params = {k: (0.5 * v).astype(np.float32) for k, v in params.items()}
  x = rng.normal(size=(n, p)).astype(np.float32)
  h = np.tanh(rng.normal(size=(n, p))).astype(np.float32)
  out = RecurrentRouterCell(p, cell=cell).apply({'params': params}, x, h)
  assert out.dtype == jnp.float32 and out.shape == (n, p)
  np.testing.assert_allclose(out, _torch_cell(params, cell)(x, h), rtol=1e-5, atol=1e-6)
  # Leading axes are free: [B, L, p] works like [B·L, p].
  out_3d = RecurrentRouterCell(p, cell=cell).apply({'params': params}, x[None], h[None])
  np.testing.assert_allclose(out_3d[0], out, rtol=1e-6, atol=1e-7)


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


def test_initial_logits_are_as_spread_as_the_linear_routers():
  """At the router study's sizes (H 256, p 128, E 16) and unit-RMS inputs, RMoE's initial logits vary from
  token to token about as much as the linear router's (std ~0.3). With the paper's N(0, 0.02) for P_l, the
  cell and G_l they had std ~0.008: a near-uniform router whose top-2 followed the logits' shared part,
  which crowded tokens onto few experts (56% dropped in training) unseen by the load-balancing loss."""
  from st_moe_jax.routers import LinearRouter
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 512, 256))
  linear = LinearRouter(16)
  linear_logits = linear.apply(linear.init(jax.random.PRNGKey(1), x), x)

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, inputs):
      cell = RecurrentRouterCell(128, name='cell')
      logits, state = RecurrentRouter(16, cell, name='layer_0')(inputs)
      return RecurrentRouter(16, cell, name='layer_1')(inputs, state)[0], logits

  stack = Stack()
  for logits in stack.apply(stack.init(jax.random.PRNGKey(1), x), x):
    spread = float(jnp.std(logits - logits.mean(axis=(0, 1), keepdims=True)))  # token to token
    linear_spread = float(jnp.std(linear_logits - linear_logits.mean(axis=(0, 1), keepdims=True)))
    assert 0.1 < linear_spread < 1.0
    assert linear_spread / 3 < spread < linear_spread * 3, (spread, linear_spread)


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


# Four decoder layers with MoE layers 1 and 3 (MIXED): the dense layer 2 sits between the two MoE layers.
CONFIG_4 = models.TransformerConfig(vocab_size=40, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                                    num_decoder_layers=4)
RMOE_MIXED = models.MoeConfig(num_sparse_layers=2, sparse_layout='MIXED', num_experts=4, expert_mlp_dim=20,
                              router='recurrent', recurrent_router_dim=P, eval_capacity_factor=4.0,
                              min_expert_capacity=1)


def test_model_routes_with_torchs_gru_over_depth_through_a_dense_layer():
  """The routing of a whole model, step by step with torch.nn.GRUCell: MoE layer l (1, then 3) scores
  experts with logits_l = h_l G_l, h_l = GRU(x_l P_l, h_prev), h_prev = 0 at layer 1 and layer 1's state at
  layer 3 (the dense layer 2 passes it through untouched); x_l is the layer's MoE input. The MoE layers
  route on exactly these logits (their sown z-loss is that of the torch logits)."""
  torch = pytest.importorskip('torch')
  assert models.sparse_layer_indices(4, 2, 'MIXED') == (1, 3)
  model = models.DecoderOnly(CONFIG_4, RMOE_MIXED)
  tokens = np.array([[0, 5, 6, 7, 8, 9], [0, 10, 11, 12, 0, 0]], np.int32)
  targets = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 12, 1, 0, 0]], np.int32)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(2), tokens, targets, enable_dropout=False))()['params']
  # Router weights and biases of order 1 (init is Normal(0, 0.02), biases 0: logits ~1e-4, a near-linear GRU).
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (0.3 * rng.normal(size=x.shape)).astype(np.float32)
      if any(getattr(k, 'key', None) == 'router' for k in path) else x, nn.unbox(params))
  names = []  # module path of each recorded call, in call order (filled while tracing)

  @jax.jit
  def run(params):
    recorded = []

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == '__call__' and isinstance(context.module, (RecurrentRouter, RecurrentRouterCell)):
        names.append('/'.join(context.module.path))
        recorded.append((args[:2], out))  # (inputs, incoming state), output
      return out

    with nn.intercept_methods(record):
      _, state = model.apply({'params': params}, tokens, targets, enable_dropout=False,
                             mutable=['intermediates'])
    return recorded, state['intermediates']

  recorded, intermediates = run(params)
  # The cell runs inside each MoE layer's router; the dense layers 0 and 2 have none.
  assert names == ['decoder/router', 'decoder/layers_1/router', 'decoder/router', 'decoder/layers_3/router']
  (cell_1, router_1, cell_3, router_3) = recorded
  p = nn.unbox(params)['decoder']
  gru = _torch_cell(p['router'], 'gru')
  real = targets > 0
  state = np.zeros(tokens.shape + (P,), np.float32)  # h_0 = 0
  for layer, cell_call, router_call in ((1, cell_1, router_1), (3, cell_3, router_3)):
    (x, incoming), (logits, new_state) = router_call
    (projected, cell_state), cell_out = cell_call
    np.testing.assert_array_equal(new_state, cell_out)  # the router hands on the cell's state
    if layer == 1:
      assert incoming is None
      np.testing.assert_array_equal(cell_state, 0.0)
    else:  # through dense layer 2 unchanged: layer 3's incoming state is exactly layer 1's new state
      np.testing.assert_array_equal(incoming, router_1[1][1])
      np.testing.assert_array_equal(cell_state, cell_1[1])
    weights = p[f'layers_{layer}']['router']
    want_projected = (torch.tensor(np.asarray(x)) @ torch.tensor(weights['input_projection']['kernel'])).numpy()
    np.testing.assert_allclose(projected, want_projected, rtol=1e-5, atol=1e-5)
    state = gru(want_projected.reshape(-1, P), state.reshape(-1, P)).reshape(state.shape)
    np.testing.assert_allclose(new_state, state, rtol=1e-5, atol=1e-5)
    want_logits = state @ weights['output_projection']['kernel']
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    # The MoE layer's z-loss (mean over real tokens of logsumexp²) is that of these logits.
    z = np.log(np.exp(want_logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(intermediates['decoder'][f'layers_{layer}']['mlp']['router_z_loss'][0],
                               np.mean(z[real] ** 2), rtol=1e-5)
  assert not np.allclose(router_1[1][0], router_3[1][0], atol=1e-3)  # the two layers route differently


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='MoeConfig.router'):
    models.MoeConfig(router='hyper')
  with pytest.raises(ValueError, match='recurrent_router_state'):
    models.MoeConfig(recurrent_router_state='frozen')
  with pytest.raises(ValueError, match='recurrent_router_dim'):
    models.MoeConfig(recurrent_router_dim=0)


def test_gin_rmoe_file(monkeypatch):
  monkeypatch.chdir(REPO)
  gin_setup.parse_model_gin(['gin/models/st_moe_tiny.gin', 'gin/routers/rmoe.gin'],
                            ['RECURRENT_ROUTER_DIM = 16'], search_paths=[REPO])
  model = gin_setup.architecture()
  assert model.encoder_moe.router == 'recurrent' and model.decoder_moe.router == 'recurrent'
  assert model.decoder_moe.recurrent_router_dim == 16
  tokens = jnp.ones((2, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))
  assert nn.unbox(shapes['params'])['decoder']['router']['hidden_kernel'].shape == (16, 48)
