"""Every router usable in a decoder is causal: tokens at positions ≥ p never change logits at positions < p.

Checked in a DecoderOnly model (attention is causal, so only routing could leak) in evaluation mode for:
  - the linear tokens-choose router without BPR, with a large eval capacity so nothing is dropped.
    Capacity dropping is a cross-token effect (which tokens an expert keeps depends on the other tokens
    of the group, later ones included), so with a small capacity a later token can evict an earlier one;
    decoding.py's rule (decode steps never drop) keeps generation itself causal.
  - RMoE's recurrent router (the state recurs over depth, not over positions).
  - Lory with the causal first segment ('uniform').
The exception, documented here: Lory's paper-faithful first segment ('self_stopgrad') routes segment 1 on
its own mean, so a later token of segment 1 changes the logits of earlier ones; from segment 2 on it is
causal.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st_moe_jax import models

CONFIG = models.TransformerConfig(vocab_size=40, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                                  num_decoder_layers=2)
LENGTH, SEGMENT = 9, 3
BASE = dict(num_sparse_layers=2, num_experts=4, expert_mlp_dim=20, extra_mlp=False)
ROUTERS = {
    'linear': models.MoeConfig(**BASE, eval_capacity_factor=4.0, min_expert_capacity=1),  # C = T: no drops
    'recurrent': models.MoeConfig(**BASE, router='recurrent', recurrent_router_dim=8,
                                  eval_capacity_factor=4.0, min_expert_capacity=1),
    'sparsemixer': models.MoeConfig(**BASE, routing_method='sparsemixer', eval_capacity_factor=4.0,
                                    min_expert_capacity=1),
    'sparsemixer_dropless': models.MoeConfig(**BASE, routing_method='sparsemixer', dropless=True),
    'top2_dropless': models.MoeConfig(**BASE, dropless=True),
    'lory': models.MoeConfig(**BASE, moe_type='lory', segment_length=SEGMENT),
    'lory_self_stopgrad': models.MoeConfig(**BASE, moe_type='lory', segment_length=SEGMENT,
                                           lory_first_segment='self_stopgrad'),
}
TOKENS = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22]], np.int32)


def _logits_fn(router):
  model = models.DecoderOnly(CONFIG, ROUTERS[router])

  @jax.jit
  def logits(tokens):  # one compiled function: params are made inside, deterministically
    params = model.init(jax.random.PRNGKey(0), TOKENS, None, enable_dropout=False)['params']
    return model.apply({'params': params}, tokens, None, enable_dropout=False)
  return logits


def _changed_from(p):
  changed = TOKENS.copy()
  changed[:, p:] = (TOKENS[:, p:] * 7 + 3) % 35 + 2  # other non-zero tokens (padding stays unchanged)
  assert np.all(changed[:, p:] != TOKENS[:, p:])
  return changed


@pytest.mark.parametrize('router', ['linear', 'recurrent', 'sparsemixer', 'sparsemixer_dropless', 'top2_dropless',
                                    'lory'])
def test_future_tokens_never_change_past_logits(router):
  logits = _logits_fn(router)
  base = np.asarray(logits(TOKENS))
  for p in range(1, LENGTH):  # inside segments and at segment boundaries (Lory: 3, 6)
    changed = np.asarray(logits(_changed_from(p)))
    np.testing.assert_allclose(changed[:, :p], base[:, :p], rtol=1e-5, atol=1e-6, err_msg=f'p={p}')
    assert not np.allclose(changed[:, p], base[:, p]), p  # the change itself is seen


def test_lory_paper_first_segment_is_the_documented_exception():
  """'self_stopgrad': segment 1's forward pass uses its own mean, so position 0 sees tokens 1 and 2.
  The stop-gradient only keeps training from exploiting this. Segments ≥ 2 route on the previous one."""
  logits = _logits_fn('lory_self_stopgrad')
  base = np.asarray(logits(TOKENS))
  leaky = np.asarray(logits(_changed_from(1)))
  assert not np.allclose(leaky[:, 0], base[:, 0], rtol=1e-5, atol=1e-6)
  for p in range(SEGMENT, LENGTH):
    changed = np.asarray(logits(_changed_from(p)))
    np.testing.assert_allclose(changed[:, :p], base[:, :p], rtol=1e-5, atol=1e-6, err_msg=f'p={p}')
