"""HuggingFace Switch Transformers import: their weights as our parameters, saved with orbax for fine-tuning.

HF Switch semantics and how they map onto ours (checked against `transformers`' SwitchTransformers code):
- T5 1.0 blocks: pre-norm RMSNorm, unscaled dot-product attention with one relative position bias per stack
  (HF keeps it in block 0), ReLU FFN `wi`/`wo`, tied embeddings with logits scaled by 1/√d_model.
- Sparse layers: layer i is sparse iff i % step == 1 (or step == 1), step = layers // sparse layers; this is
  our MIXED layout whenever step divides evenly (all released checkpoints: every other layer).
- Routing: top-1 on float32 router probabilities, per sequence (each batch row is its own group), a fixed
  `expert_capacity` per expert and sequence, first come first served in token order; dropped tokens output
  zero (the residual carries them); the expert output is scaled by the top-1 probability. We realise this
  with MoeConfig(group_by_sequence=True, expert_capacity=C, num_selected_experts=1).
- Difference: HF routes padding tokens (router_ignore_padding_tokens=False) and lets them take capacity;
  ours never routes padding. Logits agree wherever no padding competes for capacity.
"""

import dataclasses
import json
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from st_moe_jax import fileio
from st_moe_jax import models

Params = dict[str, Any]

_HF_ACTIVATIONS = {'relu': ('relu',), 'gelu_new': ('gelu',), 'gelu_pytorch_tanh': ('gelu',)}


# ---------------------------------------------------------------------------------------------------------
# Config.

def _hf_sparse_layers(num_layers: int, num_sparse: int) -> tuple[int, ...]:
  """HF's rule for which layers are sparse."""
  if num_sparse <= 0:
    return ()
  step = num_layers // num_sparse
  return tuple(i for i in range(num_layers) if step == 1 or i % step == 1)


def _stack_moe(hf: Mapping[str, Any], num_layers: int, num_sparse: int, stack: str,
               activations: tuple[str, ...]) -> models.MoeConfig:
  wanted = _hf_sparse_layers(num_layers, num_sparse)
  layout = 'MIXED'
  if wanted:
    for candidate in models.LAYOUTS:
      try:
        if models.sparse_layer_indices(num_layers, len(wanted), candidate) == wanted:
          layout = candidate
          break
      except ValueError:
        continue
    else:
      raise ValueError(f'The HF checkpoint\'s {stack} sparse layers {wanted} match none of the layouts '
                       f'{models.LAYOUTS}; only evenly spaced sparse layers can be imported.')
  return models.MoeConfig(
      num_sparse_layers=len(wanted), sparse_layout=layout, extra_mlp=False,
      num_experts=int(hf['num_experts']), expert_mlp_dim=int(hf['d_ff']), expert_activations=activations,
      num_selected_experts=1, group_by_sequence=True, expert_capacity=int(hf['expert_capacity']),
      min_expert_capacity=1, jitter_noise=float(hf.get('router_jitter_noise', 0.0)),
      expert_dropout_rate=float(hf.get('dropout_rate', 0.0)))


def model_from_hf_config(hf_config: Union[Mapping[str, Any], Any]) -> models.EncoderDecoder:
  """Our EncoderDecoder reproducing a `SwitchTransformersConfig` (a dict or the config object)."""
  hf = dict(hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict())
  if hf.get('router_bias'):
    raise ValueError('router_bias=True HF checkpoints are not supported: our router has no bias.')
  act = hf.get('dense_act_fn', 'relu')
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f'Unsupported HF dense_act_fn {act!r}; supported: {sorted(_HF_ACTIVATIONS)}.')
  activations = _HF_ACTIVATIONS[act]
  num_layers = int(hf['num_layers'])
  num_decoder_layers = int(hf.get('num_decoder_layers') or num_layers)
  config = models.TransformerConfig(
      vocab_size=int(hf['vocab_size']), embed_dim=int(hf['d_model']), num_heads=int(hf['num_heads']),
      head_dim=int(hf['d_kv']), mlp_dim=int(hf['d_ff']), num_encoder_layers=num_layers,
      num_decoder_layers=num_decoder_layers, activations=activations,
      dropout_rate=float(hf.get('dropout_rate', 0.0)),
      logits_via_embedding=bool(hf.get('tie_word_embeddings', True)), dtype='float32',
      relpos_num_buckets=int(hf.get('relative_attention_num_buckets', 32)),
      relpos_max_distance=int(hf.get('relative_attention_max_distance', 128)),
      layer_norm_epsilon=float(hf.get('layer_norm_epsilon', 1e-6)))
  encoder_moe = _stack_moe(hf, num_layers, int(hf.get('num_sparse_encoder_layers', 0)), 'encoder',
                           activations)
  decoder_moe = _stack_moe(hf, num_decoder_layers, int(hf.get('num_sparse_decoder_layers', 0)), 'decoder',
                           activations)
  return models.EncoderDecoder(config, encoder_moe, decoder_moe)


# ---------------------------------------------------------------------------------------------------------
# Weights.

class _Reader:
  """Pops HF tensors by name as float32 numpy, remembering what was used."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self.tensors = {k: v for k, v in state_dict.items()}
    self.used: set[str] = set()
    self.missing: list[str] = []

  def __call__(self, name: str) -> Optional[np.ndarray]:
    if name not in self.tensors:
      self.missing.append(name)
      return None
    self.used.add(name)
    value = self.tensors[name]
    if hasattr(value, 'detach'):  # torch tensor
      value = value.detach().float().cpu().numpy()
    return np.asarray(value, np.float32)


def _t(x: Optional[np.ndarray], shape: Optional[tuple[int, ...]] = None) -> Optional[np.ndarray]:
  """Transposed (torch Linear stores [out, in]) and optionally reshaped."""
  if x is None:
    return None
  x = x.T
  if shape is None or x.size != int(np.prod(shape)):
    return x  # a wrong size is reported by the shape check, naming the parameter
  return x.reshape(shape)


def _attention(read: _Reader, prefix: str, cfg: models.TransformerConfig) -> Params:
  h, n, d = cfg.embed_dim, cfg.num_heads, cfg.head_dim
  return {'query': {'kernel': _t(read(f'{prefix}.q.weight'), (h, n, d))},
          'key': {'kernel': _t(read(f'{prefix}.k.weight'), (h, n, d))},
          'value': {'kernel': _t(read(f'{prefix}.v.weight'), (h, n, d))},
          'out': {'kernel': _t(read(f'{prefix}.o.weight'), (n, d, h))}}


def _ffn(read: _Reader, prefix: str, sparse: bool, moe: Optional[models.MoeConfig]) -> Params:
  if not sparse:
    return {'wi': {'kernel': _t(read(f'{prefix}.wi.weight'))}, 'wo': {'kernel': _t(read(f'{prefix}.wo.weight'))}}
  experts = range(moe.num_experts)
  wi = [_t(read(f'{prefix}.experts.expert_{e}.wi.weight')) for e in experts]
  wo = [_t(read(f'{prefix}.experts.expert_{e}.wo.weight')) for e in experts]
  stack = lambda xs: None if any(x is None for x in xs) else np.stack(xs)
  return {'router': {'router_weights': {'w': {'kernel': _t(read(f'{prefix}.router.classifier.weight'))}}},
          'expert': {'wi': {'kernel': stack(wi)}, 'wo': {'kernel': stack(wo)}}}


def _stack(read: _Reader, name: str, num_layers: int, moe: Optional[models.MoeConfig],
           cfg: models.TransformerConfig) -> Params:
  decoder = name == 'decoder'
  sparse = set(models.sparse_layer_indices(num_layers, moe.num_sparse_layers, moe.sparse_layout)
               if moe else ())
  bias = read(f'{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight')
  out: Params = {'relpos_bias': {'rel_embedding': None if bias is None else bias.T},
                 f'{name}_norm': {'scale': read(f'{name}.final_layer_norm.weight')}}
  for i in range(num_layers):
    block = f'{name}.block.{i}.layer'
    attn = 'self_attention' if decoder else 'attention'
    layer = {f'pre_{attn}_layer_norm': {'scale': read(f'{block}.0.layer_norm.weight')},
             attn: _attention(read, f'{block}.0.SelfAttention', cfg)}
    ff = 1
    if decoder:
      layer['pre_cross_attention_layer_norm'] = {'scale': read(f'{block}.1.layer_norm.weight')}
      layer['encoder_decoder_attention'] = _attention(read, f'{block}.1.EncDecAttention', cfg)
      ff = 2
    layer['pre_mlp_layer_norm'] = {'scale': read(f'{block}.{ff}.layer_norm.weight')}
    layer['mlp'] = _ffn(read, f'{block}.{ff}.mlp', i in sparse, moe)
    out[f'layers_{i}'] = layer
  return out


def convert_hf_switch_state_dict(state_dict: Mapping[str, Any], model: models.EncoderDecoder) -> Params:
  """HF Switch tensors (name -> torch / numpy array) -> our params tree (float32 numpy).

  Raises:
    ValueError listing every missing, unexpected or mis-shaped parameter.
  """
  cfg = model.config
  read = _Reader(state_dict)
  params: Params = {'token_embedder': {'embedding': read('shared.weight')},
                    'encoder': _stack(read, 'encoder', cfg.num_encoder_layers, model.encoder_moe, cfg),
                    'decoder': _stack(read, 'decoder', cfg.num_decoder_layers, model.decoder_moe, cfg)}
  if not cfg.logits_via_embedding:
    params['decoder']['logits_dense'] = {'kernel': _t(read('lm_head.weight'))}
  # Copies of the shared embedding carry nothing new; anything else cannot map onto one token_embedder
  # (transformers 5 unties them too when tie_word_embeddings=False).
  ignorable = {'encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'}
  problems = []
  shared = params['token_embedder']['embedding']
  for name in sorted(ignorable & set(read.tensors)):
    copy = read(name)
    if shared is not None and not (copy.shape == shared.shape and np.array_equal(copy, shared)):
      problems.append(f'{name} differs from shared.weight: separate input embeddings per stack are not '
                      f'supported (one token_embedder is shared by encoder, decoder and tied logits)')
  if cfg.logits_via_embedding:
    ignorable.add('lm_head.weight')
  unexpected = sorted(set(read.tensors) - read.used - ignorable)

  expected = jax.eval_shape(lambda: _init_params(model))
  problems += [f'missing in checkpoint: {name}' for name in read.missing]
  problems += [f'unexpected in checkpoint: {name}' for name in unexpected]
  flat_expected = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  flat_got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
  for path, spec in flat_expected.items():
    got = flat_got.get(path)
    if got is not None and tuple(got.shape) != tuple(spec.shape):
      problems.append(f'shape mismatch at {path}: checkpoint {tuple(got.shape)}, model {tuple(spec.shape)}')
  missing_params = set(flat_expected) - set(flat_got)
  problems += [f'no checkpoint tensor for model param {p}' for p in sorted(missing_params)]
  if problems:
    raise ValueError('The HF checkpoint does not match the model config:\n  ' + '\n  '.join(problems))
  return params


def _init_params(model: models.EncoderDecoder) -> Params:
  tokens = jnp.ones((1, 2), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False)
  return nn.unbox(variables)['params']


def load_hf_state_dict(path: str) -> dict[str, Any]:
  """Tensors of a `save_pretrained` directory: safetensors (single or sharded) or pytorch_model.bin."""
  single = fileio.join(path, 'model.safetensors')
  index = fileio.join(path, 'model.safetensors.index.json')
  if fileio.exists(single) or fileio.exists(index):
    from safetensors.numpy import load, load_file
    files = ([single] if fileio.exists(single) else
             sorted({fileio.join(path, f) for f in json.loads(fileio.read_text(index))['weight_map'].values()}))
    state: dict[str, Any] = {}
    for f in files:
      if fileio.is_remote(f):
        with fileio.open(f, 'rb') as stream:
          state.update(load(stream.read()))
      else:
        state.update(load_file(f))
    return state
  binary = fileio.join(path, 'pytorch_model.bin')
  if fileio.exists(binary):
    import torch
    with fileio.open(binary, 'rb') as stream:
      return torch.load(stream, map_location='cpu', weights_only=True)
  raise FileNotFoundError(f'No model.safetensors(.index.json) or pytorch_model.bin in {path!r}; pass a '
                          f'directory written by save_pretrained.')


def import_hf_switch(path_or_state_dict: Union[str, Mapping[str, Any]],
                     config: Optional[Union[Mapping[str, Any], Any]] = None
                     ) -> tuple[models.EncoderDecoder, Params]:
  """Reads a HuggingFace Switch Transformers checkpoint.

  Args:
    path_or_state_dict: a `save_pretrained` directory, or a state dict (then `config` is required).
    config: the HF config (dict or SwitchTransformersConfig); default: the directory's config.json.

  Returns:
    (model, params): our EncoderDecoder and its float32 params (plain arrays, no axis metadata).
  """
  if isinstance(path_or_state_dict, str):
    if config is None:
      config = json.loads(fileio.read_text(fileio.join(path_or_state_dict, 'config.json')))
    state_dict = load_hf_state_dict(path_or_state_dict)
  else:
    if config is None:
      raise ValueError('import_hf_switch(state_dict) needs config= (the HF SwitchTransformersConfig).')
    state_dict = path_or_state_dict
  model = model_from_hf_config(config)
  params = convert_hf_switch_state_dict(state_dict, model)
  return model, jax.tree_util.tree_map(jnp.asarray, params)


# ---------------------------------------------------------------------------------------------------------
# Saving.

def model_gin(model: models.EncoderDecoder) -> str:
  """Gin bindings that rebuild `model` (after `import st_moe_jax.gin_setup`)."""
  lines = ['ARCHITECTURE = @models.EncoderDecoder()',
           'models.EncoderDecoder.config = @models.TransformerConfig()',
           'models.EncoderDecoder.encoder_moe = @encoder/models.MoeConfig()',
           'models.EncoderDecoder.decoder_moe = @decoder/models.MoeConfig()']
  for scope, obj in (('', model.config), ('encoder/', model.encoder_moe), ('decoder/', model.decoder_moe)):
    for field in dataclasses.fields(obj):
      value = getattr(obj, field.name)
      value = str(value.name) if field.name == 'dtype' else value
      lines.append(f'{scope}models.{type(obj).__name__}.{field.name} = {value!r}')
  return '\n'.join(lines) + '\n'


def save_params(params: Params, directory: str, model: Optional[models.EncoderDecoder] = None) -> None:
  """Writes params as an orbax PyTree checkpoint under directory/params (+ model.gin if model given)."""
  import orbax.checkpoint as ocp
  fileio.makedirs(directory)
  ocp.PyTreeCheckpointer().save(fileio.absolute(fileio.join(directory, 'params')), params, force=True)
  if model is not None:
    fileio.write_text(fileio.join(directory, 'model.gin'), model_gin(model))


def restore_params(directory: str) -> Params:
  """Reads params written by `save_params`."""
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(fileio.absolute(fileio.join(directory, 'params')))
