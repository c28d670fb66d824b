"""HuggingFace Switch Transformers import against the real peer: a tiny random HF model, same logits."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='pip install -r requirements-test.txt (torch CPU, transformers)')
transformers = pytest.importorskip('transformers')

from st_moe_jax import hf_switch, losses  # noqa: E402

BATCH, ENC_LEN, DEC_LEN = 2, 7, 5


def _hf_model(expert_capacity, tie=True):
  config = transformers.SwitchTransformersConfig(
      vocab_size=60, d_model=16, d_kv=4, d_ff=24, num_heads=2, num_layers=2, num_decoder_layers=4,
      num_sparse_encoder_layers=1, num_sparse_decoder_layers=2, num_experts=4, expert_capacity=expert_capacity,
      dropout_rate=0.0, router_jitter_noise=0.0, tie_word_embeddings=tie, relative_attention_num_buckets=8,
      relative_attention_max_distance=12)
  torch.manual_seed(0)
  model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
  with torch.no_grad():  # HF's init makes routers near-uniform; spread them so routing is decisive
    for name, p in model.named_parameters():
      if 'router' in name:
        p.mul_(30.0)
    if not tie:  # transformers 5 then unties the stacks' input embeddings too; real checkpoints share them
      model.encoder.embed_tokens.weight.copy_(model.shared.weight)
      model.decoder.embed_tokens.weight.copy_(model.shared.weight)
  return model


def _inputs():
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 60, size=(BATCH, ENC_LEN))  # no padding: HF would route it
  targets = rng.integers(2, 60, size=(BATCH, DEC_LEN))
  dec_in = np.concatenate([np.zeros((BATCH, 1), np.int64), targets[:, :-1]], 1)
  return enc, dec_in, targets


def _hf_logits(model, enc, dec_in):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec_in))
  return out.logits.numpy()


def _ours(model, params, enc, dec_in, targets):
  logits, state = model.apply({'params': params}, enc.astype(np.int32), dec_in.astype(np.int32),
                              targets.astype(np.int32), enable_dropout=False, mutable=['intermediates'])
  return np.asarray(logits), losses.moe_metrics(state['intermediates'])


@pytest.mark.parametrize('capacity,tie,drops', [(ENC_LEN, True, False), (1, False, True)],
                         ids=['no_drops_tied', 'drops_untied'])
def test_logits_match_hf(tmp_path, capacity, tie, drops):
  hf = _hf_model(capacity, tie)
  hf.save_pretrained(str(tmp_path))
  model, params = hf_switch.import_hf_switch(str(tmp_path))
  assert model.decoder_moe.sparse_layout == 'MIXED' and model.decoder_moe.num_sparse_layers == 2
  assert model.config.logits_via_embedding == tie
  enc, dec_in, targets = _inputs()
  ours, metrics = _ours(model, params, enc, dec_in, targets)
  np.testing.assert_allclose(ours, _hf_logits(hf, enc, dec_in), rtol=1e-4, atol=1e-4)
  assert (float(metrics['fraction_tokens_left_behind']) > 0) == drops


def test_state_dict_import_and_mismatch_errors():
  hf = _hf_model(ENC_LEN)
  state = dict(hf.state_dict())
  model, params = hf_switch.import_hf_switch(state, hf.config)
  enc, dec_in, targets = _inputs()
  np.testing.assert_allclose(_ours(model, params, enc, dec_in, targets)[0], _hf_logits(hf, enc, dec_in),
                             rtol=1e-4, atol=1e-4)
  bad = dict(state)
  bad['encoder.block.1.layer.0.SelfAttention.q.weight'] = torch.zeros(4, 16)
  del bad['decoder.block.1.layer.2.mlp.experts.expert_3.wo.weight']
  bad['encoder.block.0.layer.1.mlp.extra.weight'] = torch.zeros(1)
  bad['decoder.embed_tokens.weight'] = torch.zeros(60, 16)
  with pytest.raises(ValueError) as err:
    hf_switch.import_hf_switch(bad, hf.config)
  message = str(err.value)
  assert 'missing in checkpoint: decoder.block.1.layer.2.mlp.experts.expert_3.wo.weight' in message
  assert 'unexpected in checkpoint: encoder.block.0.layer.1.mlp.extra.weight' in message
  assert "shape mismatch at ['encoder']['layers_1']['attention']['query']['kernel']" in message
  assert 'decoder.embed_tokens.weight differs from shared.weight' in message
  with pytest.raises(ValueError, match='needs config'):
    hf_switch.import_hf_switch(state)


def test_convert_script_writes_a_restorable_checkpoint(tmp_path):
  import importlib.util
  hf = _hf_model(ENC_LEN)
  hf.save_pretrained(str(tmp_path / 'hf'))
  spec = importlib.util.spec_from_file_location(
      'convert_hf_switch', os.path.join(os.path.dirname(__file__), '..', 'scripts', 'convert_hf_switch.py'))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  script.main(['--hf_dir', str(tmp_path / 'hf'), '--out', str(tmp_path / 'ckpt')])
  restored = hf_switch.restore_params(str(tmp_path / 'ckpt'))
  _, params = hf_switch.import_hf_switch(str(tmp_path / 'hf'))
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, jax.tree_util.tree_map(np.asarray, params))
  gin_text = (tmp_path / 'ckpt' / 'model.gin').read_text()
  assert 'encoder/models.MoeConfig.group_by_sequence = True' in gin_text
