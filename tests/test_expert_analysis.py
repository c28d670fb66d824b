"""scripts/expert_analysis.py on a tiny decoder-only ST-MoE checkpoint: the per-expert loads, confidences and
top tokens equal a direct computation (top-1 expert recomputed from the router kernel and the router's input
captured from the model), the heat map and HTML are written, and bad input is a one-line error."""

import collections
import json
import os
import shutil
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'scripts'))

STEP = 3
BATCHES = 3
MIN_COUNT = 2
GIN_FILES = ['gin/runs/pretrain.gin', 'gin/models/st_moe_tiny.gin', 'gin/runs/decoder_only.gin']
# tests/test_preemption.py's tiny dims; 8 x 32 tokens cut into 4 routing groups of 64.
BINDINGS = ["MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}", 'BATCH_SIZE = 8',
            'EMBED_DIM = 32', 'MLP_DIM = 48', 'NUM_HEADS = 2', 'HEAD_DIM = 16', 'NUM_EXPERTS = 4',
            'EXPERT_MLP_DIM = 32', 'GROUP_SIZE = 64', f'TRAIN_STEPS = {STEP}', 'EVAL_PERIOD = 0',
            "DISPATCH_METHOD = 'einsum'"]  # compiles faster than 'gather' (same routing)


def make_checkpoint(model_dir: str, bindings=(), router_scale: float = 30.0, gin_files=GIN_FILES) -> None:
  """MODEL_DIR/checkpoint_<STEP>/params (fresh parameters, the router kernels scaled so that routing is far
  from uniform) and MODEL_DIR/config.gin, the operative config train.py writes: train() is called on the
  finished MODEL_DIR, which it leaves at once, after gin has recorded the model and data bindings."""
  import gin
  import jax
  import orbax.checkpoint as ocp
  from st_moe_jax import cli, gin_setup, trainer as trainer_lib
  from st_moe_jax import train as train_lib
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    gin_setup.parse_model_gin(gin_files, BINDINGS + [f"MODEL_DIR = '{model_dir}'", *bindings])
    model = gin_setup.architecture()
    mesh = cli.create_mesh(1, 1, model, devices=jax.devices()[:1])
    evaluator = trainer_lib.Evaluator(model, mesh, model_kind=cli.model_kind(model))
    zeros = np.zeros((8, 32), np.int32)
    batch = {'decoder_input_tokens': zeros, 'decoder_target_tokens': zeros}
    if evaluator.kind == 'encoder_decoder':
      batch['encoder_input_tokens'] = zeros
    evaluator.prepare(batch)
    params = jax.device_get(evaluator.init_params())
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf * router_scale if 'router' in jax.tree_util.keystr(path) else leaf, params)
    ocp.PyTreeCheckpointer().save(os.path.join(model_dir, f'checkpoint_{STEP}', 'params'), params)
    assert cli.call_configurable(train_lib.train, 'train') is None  # already at TRAIN_STEPS
    with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
      f.write(gin.operative_config_str())
  finally:
    os.chdir(cwd)
    gin.clear_config()


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('expert_analysis') / 'run')
  make_checkpoint(path)
  return path


@pytest.fixture(scope='module')
def report(model_dir):
  import expert_analysis
  out_dir = os.path.join(model_dir, 'analysis')
  printed = []
  result = expert_analysis.run_analysis(expert_analysis.parse_args(
      ['--checkpoint', model_dir, '--out_dir', out_dir, '--batches', str(BATCHES), '--min_count',
       str(MIN_COUNT), '--sample_tokens', '24']), print_fn=printed.append)
  with open(os.path.join(out_dir, 'expert_analysis.json')) as f:
    saved = json.load(f)
  return {'result': result, 'saved': saved, 'printed': '\n'.join(printed), 'out_dir': out_dir}


def direct_routing(model_dir: str):
  """(per-batch top-1 expert [B, L], its probability, tokens, real) of decoder/layers_1 computed here: the
  router's input captured with flax's method interceptor, times the router kernel from the checkpoint."""
  import flax.linen as nn
  import gin
  import jax
  import orbax.checkpoint as ocp
  from st_moe_jax import data as data_lib, gin_setup, trainer as trainer_lib
  from st_moe_jax.routers import LinearRouter
  gin_setup.parse_model_gin([os.path.join(model_dir, 'config.gin')])
  with gin.config_scope('ARCHITECTURE'):
    model = gin_setup.architecture()
  gin.clear_config()
  params = ocp.PyTreeCheckpointer().restore(os.path.join(model_dir, f'checkpoint_{STEP}', 'params'))
  kernel = np.asarray(params['decoder']['layers_1']['mlp']['router']['router_weights']['w']['kernel'])
  cfg = data_lib.DatasetConfig('stdlib_lm', {'targets': 32}, 'validation', 8, shuffle=False, num_epochs=1)
  paths = []

  @jax.jit
  def router_inputs(batch):
    captured = []

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, LinearRouter):
        paths.append(context.module.scope.path)
        captured.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply({'params': params}, **trainer_lib.model_inputs(batch, data_lib.DECODER_ONLY),
                  enable_dropout=False)
    return captured

  out = []
  for i, batch in enumerate(data_lib.DataIterator(data_lib.get_dataset(cfg, data_lib.DECODER_ONLY))):
    if i == BATCHES:
      break
    x, = router_inputs(batch)
    x = np.asarray(x)
    assert paths[0][:2] == ('decoder', 'layers_1')
    logits = x.astype(np.float64) @ kernel  # [G, T, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    shape = batch['decoder_input_tokens'].shape
    assert np.prod(probs.shape[:2]) == np.prod(shape)  # no padding added by the grouping
    out.append((probs.argmax(-1).reshape(shape), probs.max(-1).reshape(shape), batch['decoder_input_tokens'],
                batch['decoder_target_tokens'] > 0))
  return out


def test_counts_match_a_direct_computation(model_dir, report):
  rep = report['saved']
  assert list(rep['layers']) == ['decoder/layers_1']
  assert rep['batches'] == BATCHES and rep['step'] == STEP and rep['task'] == 'stdlib_lm'
  layer = rep['layers']['decoder/layers_1']
  routed = direct_routing(model_dir)
  expert = np.concatenate([e[r] for e, _, _, r in routed])
  prob = np.concatenate([p[r] for _, p, _, r in routed])
  token = np.concatenate([t[r] for _, _, t, r in routed])
  total = len(token)
  assert layer['tokens'] == total
  base = collections.Counter(token.tolist())
  loads = np.bincount(expert, minlength=4) / total
  assert 0.02 < loads.max() - loads.min()  # scaled router: far from uniform, so the check means something
  for e, stats in enumerate(layer['experts']):
    assert stats['expert'] == e
    assert stats['load'] == pytest.approx(loads[e], abs=1e-12)
    mine = expert == e
    if mine.any():
      assert stats['mean_confidence'] == pytest.approx(prob[mine].mean(), rel=1e-4)
    received = collections.Counter(token[mine].tolist())
    expected = sorted(((received[t] / mine.sum()) / (base[t] / total), received[t], t)
                      for t in received if received[t] >= MIN_COUNT)
    expected.sort(key=lambda x: (-x[0], -x[1], x[2]))
    got = stats['top_tokens']
    assert [g['id'] for g in got] == [t for _, _, t in expected[:10]]
    for g, (ratio, count, t) in zip(got, expected):
      assert g['count'] == count and g['base_count'] == base[t]
      assert g['ratio'] == pytest.approx(ratio, rel=1e-9)
  assert sum(s['tokens'] for s in layer['experts']) == total
  # Class and context shares: each sums to 1 and the load-weighted mean over experts is the base.
  for key, base_key in (('classes', 'base_classes'), ('contexts', 'base_contexts')):
    for stats in layer['experts']:
      if stats['tokens']:
        assert sum(stats[key].values()) == pytest.approx(1.0)
    for name, share in layer[base_key].items():
      assert share == pytest.approx(sum(s['load'] * s[key][name] for s in layer['experts']), abs=1e-9)
  assert layer['base_contexts']['indentation'] > 0 and layer['base_contexts']['keyword'] > 0


def test_outputs_written(report):
  import expert_analysis
  out_dir, rep = report['out_dir'], report['saved']
  layer = rep['layers']['decoder/layers_1']
  for name in layer['files'].values():
    assert os.path.getsize(os.path.join(out_dir, name)) > 1000, name
  with open(os.path.join(out_dir, layer['files']['heatmap']), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  page = open(os.path.join(out_dir, layer['files']['html']), encoding='utf-8').read()
  sample = layer['sample']
  assert len(sample['tokens']) == 24 and page.count('class="t" style="background:') == 24 + 4  # + legend
  assert sample['tokens'][0] == '<bos>'
  assert '| expert | load |' in report['printed'] and '## decoder/layers_1' in report['printed']
  summary = open(os.path.join(out_dir, 'expert_analysis.md'), encoding='utf-8').read()
  assert summary.strip() == report['printed'].split('\nWrote ')[0].strip()
  # Top tokens are decoded bytes with a class.
  tops = [t for ex in layer['experts'] for t in ex['top_tokens']]
  assert tops and all(t['class'] in expert_analysis.CLASSES for t in tops)


def test_token_text_and_classes():
  import seqio
  import expert_analysis as ea
  vocab = seqio.ByteVocabulary()
  ids = vocab.encode('def x1 ( 7\n\t')
  texts = [ea.token_text(vocab, i) for i in ids]
  assert texts == list('def x1 ( 7\n\t')
  assert ea.token_text(vocab, 0, decoder_start=True) == '<bos>' and ea.token_text(vocab, 1) == '</s>'
  assert ea.token_text(vocab, 3 + 0xc3) == '\\xc3' and ea.token_text(vocab, 258) == '<extra_id_0>'
  assert [ea.token_class(t) for t in ('    ', '\n', '(', '==', 'def', ' return', 'foo_1', '42', '<bos>',
                                       '\\xc3', 'é')] == [
      'whitespace', 'whitespace', 'punctuation', 'punctuation', 'keyword', 'keyword', 'identifier', 'digit',
      'special', 'other', 'identifier']


def test_token_contexts_follow_python_lexemes():
  import expert_analysis as ea
  text = "def f(x):\n    # hi\n    return x + 12 if 'a b' else None\n"
  got = ea.token_contexts(['<bos>'] + list(text))
  assert got[0] == 'special'
  spans = {'def': 'keyword', ' f': 'whitespace', '(': 'punctuation', '    #': 'indentation', '# hi': 'comment',
           'return': 'keyword', '12': 'number', "'a b'": 'string', 'None': 'keyword', '\n': 'whitespace'}
  for span, context in spans.items():
    start = text.index(span)
    assert got[1 + start] == context, span
  assert got[1 + text.index('x)')] == 'identifier'
  # SentencePiece pieces: the context of a piece's first non-space character.
  assert ea.token_contexts(['<bos>', 'def', ' foo', '(', ')', ':', '\n', '    ', ' return', ' 1', '0']) == [
      'special', 'keyword', 'identifier', 'punctuation', 'punctuation', 'punctuation', 'whitespace',
      'indentation', 'keyword', 'number', 'number']


def test_moe_layer_sows_top1_per_token():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from st_moe_jax import moe
  from st_moe_jax.config import MoeConfig
  layer = moe.MoeLayer(MoeConfig(num_experts=4, expert_mlp_dim=8, expert_activations=('relu',),
                                 group_size=4, group_multiple=4,
                                 dispatch_method='einsum'))  # 10 tokens: padded to 12
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))

  @jax.jit
  def init_and_apply(x):
    variables = layer.init(jax.random.PRNGKey(1), x, enable_dropout=False)
    return variables, layer.apply(variables, x, enable_dropout=False, mutable=['intermediates'])[1]

  variables, state = init_and_apply(x)
  inter = state['intermediates']
  kernel = nn.unbox(variables['params']['router']['router_weights']['w']['kernel'])
  probs = jax.nn.softmax(jnp.einsum('blh,he->ble', x, kernel), axis=-1)
  np.testing.assert_array_equal(inter[moe.TOP1_EXPERT][0], np.argmax(probs, -1))
  np.testing.assert_allclose(inter[moe.TOP1_PROBABILITY][0], np.max(probs, -1), rtol=1e-5)


def test_encoder_decoder_both_stacks(tmp_path):
  import expert_analysis
  model_dir = str(tmp_path / 'encdec')
  make_checkpoint(model_dir, ["MIXTURE_OR_TASK_NAME = 'stdlib_span_corruption'",
                              "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}"],
                  gin_files=GIN_FILES[:2])
  rep = expert_analysis.run_analysis(expert_analysis.parse_args(
      ['--checkpoint', model_dir, '--batches', '1', '--sample_tokens', '16']), print_fn=lambda _: None)
  assert list(rep['layers']) == ['decoder/layers_1', 'encoder/layers_1']
  for name, layer in rep['layers'].items():
    assert sum(ex['load'] for ex in layer['experts']) == pytest.approx(1.0)
    assert len(layer['sample']['tokens']) == (16 if name.startswith('encoder') else 8)
    for f in layer['files'].values():
      assert os.path.exists(os.path.join(model_dir, 'expert_analysis', f))
  assert rep['layers']['decoder/layers_1']['sample']['tokens'][0] == '<bos>'
  assert rep['layers']['encoder/layers_1']['sample']['tokens'][0] != '<bos>'


def _error(cli_error, argv):
  import expert_analysis
  err = cli_error(argv, main=expert_analysis.main)
  assert err.count('\n') == 1, err  # one line
  return err


def test_missing_checkpoint_is_an_error(cli_error, tmp_path):
  err = _error(cli_error, ['--checkpoint', str(tmp_path / 'nowhere')])
  assert 'does not exist' in err


def test_dense_checkpoint_is_an_error(cli_error, tmp_path):
  model_dir = str(tmp_path / 'dense')
  import gin
  from st_moe_jax import gin_setup
  # No parameters needed: the config says dense before anything is restored.
  os.makedirs(os.path.join(model_dir, f'checkpoint_{STEP}', 'params'))
  gin_setup.parse_model_gin([os.path.join(REPO, f) for f in GIN_FILES],
                            BINDINGS + [f"MODEL_DIR = '{model_dir}'", 'NUM_DECODER_SPARSE_LAYERS = 0'])
  with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
    f.write(gin.config_str())
  gin.clear_config()
  err = _error(cli_error, ['--checkpoint', model_dir])
  assert 'dense model (no sparse MoE layer)' in err


def test_checkpoint_not_matching_its_config_is_an_error(cli_error, model_dir, tmp_path):
  other = str(tmp_path / 'other')
  shutil.copytree(os.path.join(model_dir, f'checkpoint_{STEP}'), os.path.join(other, f'checkpoint_{STEP}'))
  config = open(os.path.join(model_dir, 'config.gin')).read()
  assert 'NUM_EXPERTS = 4\n' in config
  with open(os.path.join(other, 'config.gin'), 'w') as f:
    f.write(config.replace('NUM_EXPERTS = 4\n', 'NUM_EXPERTS = 8\n'))
  err = _error(cli_error, ['--checkpoint', os.path.join(other, f'checkpoint_{STEP}')])
  assert 'does not fit this model' in err and 'router' in err


def test_damaged_checkpoint_is_an_error(cli_error, model_dir, tmp_path):
  other = str(tmp_path / 'damaged')
  shutil.copytree(model_dir, other, ignore=shutil.ignore_patterns('analysis'))
  os.remove(os.path.join(other, f'checkpoint_{STEP}', 'params', '_METADATA'))
  err = _error(cli_error, ['--checkpoint', other])
  assert 'could not be read' in err
