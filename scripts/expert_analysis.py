r"""Expert specialisation of a trained checkpoint (ST-MoE, arXiv:2202.08906, §7 and Table 13).

  python scripts/expert_analysis.py --checkpoint runs/demo              # MODEL_DIR: its latest checkpoint
  python scripts/expert_analysis.py --checkpoint runs/demo/checkpoint_600 --batches 50 --out_dir /tmp/ea

The model, its task and its data settings come from MODEL_DIR/config.gin (the run's operative gin config,
written by st_moe_jax.train). Validation text of the run's task (MIXTURE_OR_TASK_NAME, or --task) goes
through the model teacher-forced; every sparse MoE layer (both stacks of an encoder-decoder) sows, per
token, the top-1 expert of its router's softmax and that probability (moe.TOP1_EXPERT / TOP1_PROBABILITY:
the router's preference, before capacity; with top-2 routing the second choice is not counted). Per layer
and expert it reports:

  load            fraction of the layer's real tokens whose top-1 choice is the expert
  mean confidence mean top-1 router probability over those tokens
  top tokens      the tokens it receives most often relative to their base rate,
                  ratio = (count_e(tok) / N_e) / (count(tok) / N), among the tokens with
                  count_e(tok) >= --min_count,
                  highest ratio first (--top of them), each decoded (a byte for the byte vocabulary, the
                  SentencePiece piece otherwise) and classed: whitespace (indentation, newlines),
                  punctuation, keyword (Python's keyword module), identifier, digit, special, other
  classes         the share of each class among the expert's tokens, and among all tokens ('base')
  contexts        the same for where the token sits in the text (a line-local Python lexer: indentation,
                  whitespace, comment, string, keyword, identifier, number, punctuation): a byte of `return`
                  is a letter as a token but sits in a keyword

The token a position stands for is the token the layer reads there: the encoder's input token, and the
decoder's input token (the previous target; '<bos>' at the start of a sequence).

Outputs (--out_dir, default MODEL_DIR/expert_analysis): expert_analysis.json (all numbers),
expert_analysis.md (the summary, also printed), and per layer heatmap_<layer>.png (experts × the first
--sample_tokens positions of a validation sample, each position coloured by its chosen expert, shaded by
router confidence) and routing_<layer>.html (the sample's text with every token coloured by its expert,
with a legend). Bad input (no checkpoint, a dense model, a checkpoint that does not fit its config) gives
one `ERROR:` line and exit status 2, as the entry points do.
"""

import argparse
import collections
import functools
import html
import io
import json
import keyword
import os
import re
import string
import sys
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import st_moe_jax  # noqa: E402  (sets the TF log level before anything imports TensorFlow)

st_moe_jax.import_tensorflow_quietly()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from st_moe_jax import checkpoint_manager as ckpt_lib  # noqa: E402
from st_moe_jax import cli  # noqa: E402
from st_moe_jax import data as data_lib  # noqa: E402
from st_moe_jax import fileio  # noqa: E402
from st_moe_jax import gin_setup  # noqa: E402
from st_moe_jax import losses  # noqa: E402
from st_moe_jax import moe as moe_lib  # noqa: E402
from st_moe_jax import partitioning  # noqa: E402
from st_moe_jax import trainer as trainer_lib  # noqa: E402

UserError = cli.UserError
CLASSES = ('whitespace', 'punctuation', 'keyword', 'identifier', 'digit', 'special', 'other')
# One colour per expert: matplotlib's tab10, then tab20's light shades, then tab20b / tab20c.
_PALETTES = (('tab10', slice(None)), ('tab20', slice(1, None, 2)), ('tab20b', slice(None)),
             ('tab20c', slice(None)))


# ---------------------------------------------------------------------------------------------------------
# The run: config, model, parameters, data.

class Run:
  """What config.gin and the checkpoint give: model, kind, parameters, dataset config, vocabulary."""

  def __init__(self, checkpoint: str, task: Optional[str] = None, split: str = 'validation'):
    if not fileio.exists(checkpoint):
      raise UserError(f'--checkpoint {checkpoint} does not exist: pass a MODEL_DIR (holding config.gin and '
                      'checkpoint_<step>/ folders) or one of its checkpoint_<step> folders.')
    try:
      self.checkpoint_dir = ckpt_lib.resolve_checkpoint_dir(checkpoint)
    except FileNotFoundError as e:
      raise UserError(str(e)) from e
    self.step = ckpt_lib.checkpoint_step(self.checkpoint_dir)
    self.model_dir = (fileio.dirname(self.checkpoint_dir)
                      if fileio.absolute(checkpoint).rstrip('/') == self.checkpoint_dir.rstrip('/')
                      else fileio.absolute(checkpoint))
    self.config_path = fileio.join(self.model_dir, 'config.gin')
    if not fileio.exists(self.config_path):
      raise UserError(f'{self.config_path} is missing: expert_analysis reads the model from the config.gin '
                      'st_moe_jax.train writes to MODEL_DIR; the checkpoint must sit in its MODEL_DIR.')
    self._parse_config()
    # The operative config binds the model's parameters in the macro's scope (ARCHITECTURE/DecoderOnly.moe).
    with gin.config_scope('ARCHITECTURE'):
      self.model = cli.call_configurable(gin_setup.architecture, 'ARCHITECTURE')
    self.kind = cli.model_kind(self.model)
    moes = cli.moe_configs(self.model)
    if not moes:
      raise UserError(f'{self.config_path} describes a dense model (no sparse MoE layer): there are no experts '
                      'to analyse. Pass a checkpoint of an MoE model (e.g. gin/models/st_moe_tiny.gin).')
    if any(getattr(m, 'moe_type', 'sparse') == 'lory' for m in moes):
      raise UserError('Lory layers merge all experts per segment (no per-token expert choice); '
                      'expert_analysis needs token-routed MoE layers.')
    self.num_experts = {m.num_experts for m in moes}
    name = task or gin_setup.macro('MIXTURE_OR_TASK_NAME')
    lengths = gin_setup.macro('TASK_FEATURE_LENGTHS')
    batch_size = gin_setup.macro('BATCH_SIZE')
    if not isinstance(name, str) or not isinstance(lengths, dict) or not isinstance(batch_size, int):
      raise UserError(f'{self.config_path} does not bind MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS and '
                      'BATCH_SIZE; pass --task or use the config.gin of a training run.')
    self.dataset_cfg = data_lib.DatasetConfig(
        mixture_or_task_name=name, task_feature_lengths=lengths, split=split, batch_size=batch_size,
        shuffle=False, seed=gin_setup.macro('RANDOM_SEED', 0), pack=gin_setup.macro('PACK', True),
        num_epochs=1)
    from tasks import common  # pylint: disable=g-import-not-at-top
    try:
      task_or_mixture = common.get_task_or_mixture(name)
    except (KeyError, ValueError) as e:
      raise UserError(f'Unknown task {name!r}: {e}') from e
    self.vocabulary = task_or_mixture.output_features['targets'].vocabulary
    # One device: the analysis is small and any batch size fits.
    self.mesh = cli.create_mesh(1, 1, self.model, devices=jax.devices()[:1])
    cli.check_task_fits_model(self.dataset_cfg, self.kind)
    self.dataset = data_lib.get_dataset(self.dataset_cfg, self.kind)
    spec = self.dataset.element_spec
    self.evaluator = trainer_lib.Evaluator(self.model, self.mesh, model_kind=self.kind)
    # Shapes from the pipeline's spec (batch axis: the configured batch size; short batches are padded).
    self.evaluator.prepare({k: np.zeros((batch_size,) + tuple(s.shape[1:]), s.dtype.as_numpy_dtype)
                            for k, s in spec.items()})
    # Without its tree metadata the checkpoint reads as empty, which would look like another model.
    if not fileio.exists(fileio.join(self.checkpoint_dir, 'params', '_METADATA')):
      raise ckpt_lib.CheckpointCorruptError(
          None, f'The parameters in {self.checkpoint_dir} could not be read: params/_METADATA is missing.')
    try:
      self.params, _ = ckpt_lib.restore_params(self.checkpoint_dir, self.evaluator.abstract_params)
    except ckpt_lib.CheckpointShapeError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (orbax / TensorStore: missing or damaged files)
      raise ckpt_lib.CheckpointCorruptError(
          None, f'The parameters in {self.checkpoint_dir} could not be read: '
          f'{ckpt_lib._root_cause(e)}') from e  # pylint: disable=protected-access

  @functools.cached_property
  def routing_apply(self):
    """jit of (params, batch) -> ({layer: top-1 expert [B, L]}, {layer: its probability [B, L]}), one per
    Run: other parameters of the same model (e.g. each checkpoint of the run) reuse its compilation."""
    model, kind = self.model, self.kind

    def apply(params, batch):
      _, state = model.apply({'params': params}, **trainer_lib.model_inputs(batch, kind),
                             enable_dropout=False, mutable=['intermediates'])
      inter = state.get('intermediates', {})
      sown = losses._sown_by_layer  # pylint: disable=protected-access  (the one reader of sown values)
      return ({k: v[0] for k, v in sown(inter, moe_lib.TOP1_EXPERT).items()},
              {k: v[0] for k, v in sown(inter, moe_lib.TOP1_PROBABILITY).items()})

    return jax.jit(apply)

  def _parse_config(self) -> None:
    from st_moe_jax import train  # pylint: disable=g-import-not-at-top,unused-import  (registers train_script)
    gin.clear_config()
    gin.add_config_file_search_path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
      gin.parse_config(fileio.read_text(self.config_path))  # local or gs://
    except (ValueError, IOError, SyntaxError, ImportError) as e:
      raise UserError(f'gin could not parse {self.config_path}: {e}') from e

  def batches(self, max_batches: Optional[int]):
    """Validation batches (numpy dicts, short ones padded to the batch size), at most max_batches."""
    for i, batch in enumerate(data_lib.DataIterator(self.dataset)):
      if max_batches is not None and i >= max_batches:
        return
      yield data_lib.pad_batch(batch, self.dataset_cfg.batch_size)


def stream_tokens(batch: dict[str, np.ndarray], layer: str) -> tuple[np.ndarray, np.ndarray]:
  """(token ids [B, L], real [B, L] bool) a layer of `layer`'s stack reads: the encoder's input tokens, or
  the decoder's input tokens (real where the target is, as the model's padding mask)."""
  if layer.split('/')[0] == 'encoder':
    tokens = batch['encoder_input_tokens']
    return tokens, tokens > 0
  return batch['decoder_input_tokens'], batch['decoder_target_tokens'] > 0


def routing_per_token(run: Run, batches) -> tuple[dict[str, dict[str, list[np.ndarray]]], list]:
  """Teacher-forced apply over `batches`: ({layer: {'expert': [[B, L] per batch], 'probability': [...]}},
  the batches)."""
  apply = run.routing_apply
  out: dict[str, dict[str, list[np.ndarray]]] = {}
  seen = []
  with partitioning.activate(run.mesh, run.evaluator.rules):
    for batch in batches:
      experts, probs = jax.device_get(apply(run.params, {k: np.asarray(v) for k, v in batch.items()}))
      for layer in experts:
        entry = out.setdefault(layer, {'expert': [], 'probability': []})
        entry['expert'].append(np.asarray(experts[layer]))
        entry['probability'].append(np.asarray(probs[layer]))
      seen.append(batch)
  return out, seen


# ---------------------------------------------------------------------------------------------------------
# Tokens as text.

def _is_byte_vocabulary(vocabulary) -> bool:
  import seqio  # pylint: disable=g-import-not-at-top
  return isinstance(vocabulary, seqio.ByteVocabulary)


def token_text(vocabulary, token_id: int, decoder_start: bool = False) -> str:
  """The raw text of one token: a byte ('\\n', ' ', 'a', ...; non-UTF-8 bytes as '\\xNN'), or a
  SentencePiece piece with '▁' as a space. Special ids: '<bos>' (id 0 at a decoder position), '<pad>',
  '</s>', '<unk>'."""
  if token_id == 0:
    return '<bos>' if decoder_start else '<pad>'
  if _is_byte_vocabulary(vocabulary):
    special = getattr(vocabulary, '_num_special_tokens', 3)
    if token_id == 1:
      return '</s>'
    if token_id >= special + 256:
      return _sentinel(vocabulary, token_id)
    if token_id < special:
      return '<unk>'
    b = token_id - special
    if b >= 0xf5:  # never in UTF-8 text: seqio's sentinels (span corruption) count down from the top id
      return _sentinel(vocabulary, token_id)
    return chr(b) if b < 128 else f'\\x{b:02x}'
  try:
    piece = vocabulary.tokenizer.id_to_piece(int(token_id))
  except Exception:  # pylint: disable=broad-except  (an id past the SentencePiece model: a sentinel)
    return _sentinel(vocabulary, token_id)
  return piece.replace('\u2581', ' ')


def _sentinel(vocabulary, token_id: int) -> str:
  """seqio's sentinels count down from the top id: <extra_id_0> is vocab_size - 1."""
  n = vocabulary.vocab_size - 1 - int(token_id)
  return f'<extra_id_{n}>' if n >= 0 else '<unk>'


_SPECIAL = re.compile(r'<bos>|<pad>|</s>|<unk>|<extra_id_\d+>')


def token_class(text: str) -> str:
  """whitespace / punctuation / keyword / identifier / digit / special / other, of a token's text."""
  if _SPECIAL.fullmatch(text):
    return 'special'
  if text.startswith('\\x'):
    return 'other'
  if text == '' or text.isspace():
    return 'whitespace'
  core = text.strip()
  if core.isdigit():
    return 'digit'
  if keyword.iskeyword(core):
    return 'keyword'
  if core.isidentifier():
    return 'identifier'
  if all(c in string.punctuation for c in core):
    return 'punctuation'
  return 'other'


def display(text: str) -> str:
  """A token's text for a table cell: whitespace made visible."""
  return (text.replace('\\', '\\\\').replace('\n', '\\n').replace('\t', '\\t').replace('\r', '\\r')
          .replace(' ', '␣').replace('|', '\\|'))


# Where a token sits in the text: a byte of `return` is a keyword byte although the byte itself is a letter.
CONTEXTS = ('indentation', 'whitespace', 'comment', 'string', 'keyword', 'identifier', 'number',
            'punctuation', 'special', 'other')
_LEXEME = re.compile(r"""
    (?P<indentation>(?<![^\n\x00])[ \t]+)
  | (?P<whitespace>\n|[^\S\n]+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>[rbuRBUfF]{0,2}(?:'[^'\n\\]*(?:\\.[^'\n\\]*)*'?|"[^"\n\\]*(?:\\.[^"\n\\]*)*"?))
  | (?P<word>[^\W\d]\w*)
  | (?P<number>\d[\w.]*)
  | (?P<punctuation>[!-/:-@\[-`{-~])
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)


def token_contexts(texts: Sequence[str]) -> list[str]:
  """The context class of each token of a sequence: the Python lexeme (a rough, line-local lexer) its first
  non-space character falls in; 'indentation' / 'whitespace' for tokens of whitespace only, 'special' for
  <bos>, </s>, ... Strings and comments do not span lines (a triple-quoted docstring's lines read as code)."""
  pieces, starts, offset = [], [], 0
  for text in texts:
    piece = '\x00' if token_class(text) == 'special' else (
        '\ufffd' if text.startswith('\\x') else text)
    starts.append(offset)
    pieces.append(piece)
    offset += len(piece)
  joined = ''.join(pieces)
  kind = [''] * len(joined)
  for m in _LEXEME.finditer(joined):
    name = m.lastgroup
    if name == 'word':
      name = 'keyword' if keyword.iskeyword(m.group()) else 'identifier'
    kind[m.start():m.end()] = [name] * (m.end() - m.start())
  out = []
  for text, piece, start in zip(texts, pieces, starts):
    if piece == '\x00':
      out.append('special')
      continue
    where = next((start + i for i, c in enumerate(piece) if not c.isspace()), None)
    out.append(kind[start] if where is None else kind[where])
  return out


# ---------------------------------------------------------------------------------------------------------
# Counting.

def layer_statistics(experts: Sequence[np.ndarray], probs: Sequence[np.ndarray], tokens: Sequence[np.ndarray],
                     real: Sequence[np.ndarray], num_experts: int, vocabulary, starts: Sequence[np.ndarray],
                     min_count: int = 5, top: int = 10,
                     contexts: Optional[Sequence[np.ndarray]] = None) -> dict[str, Any]:
  """Per-expert load, mean confidence, top tokens by ratio to base rate, and class shares of one layer.

  experts, probs, tokens, real, starts: per batch [B, L] arrays (starts: decoder positions that begin a
  sequence, where id 0 is <bos>); contexts: per batch [B, L] indices into CONTEXTS. Only real positions
  count.
  """
  mask = np.concatenate([r.reshape(-1) for r in real]).astype(bool)
  e = np.concatenate([x.reshape(-1) for x in experts])[mask].astype(np.int64)
  p = np.concatenate([x.reshape(-1) for x in probs])[mask].astype(np.float64)
  t = np.concatenate([x.reshape(-1) for x in tokens])[mask].astype(np.int64)
  s = np.concatenate([x.reshape(-1) for x in starts])[mask].astype(bool)
  total = int(mask.sum())
  vocab = int(t.max()) + 1 if t.size else 1
  per_token = np.bincount(t, minlength=vocab)
  joint = np.zeros((num_experts, vocab), np.int64)
  np.add.at(joint, (e, t), 1)
  counts = np.bincount(e, minlength=num_experts)
  conf = np.bincount(e, weights=p, minlength=num_experts)
  texts = {int(i): token_text(vocabulary, int(i), decoder_start=bool(s[t == i].any()) if i == 0 else False)
           for i in np.nonzero(per_token)[0]}
  classes = {i: token_class(x) for i, x in texts.items()}

  def class_shares(row: np.ndarray) -> dict[str, float]:
    n = row.sum()
    shares = collections.Counter()
    for i in np.nonzero(row)[0]:
      shares[classes[int(i)]] += row[i]
    return {c: float(shares[c] / n) if n else 0.0 for c in CLASSES}

  if contexts is not None:
    ctx = np.concatenate([x.reshape(-1) for x in contexts])[mask].astype(np.int64)
    by_context = np.zeros((num_experts, len(CONTEXTS)), np.int64)
    np.add.at(by_context, (e, ctx), 1)
    context_shares = lambda row: {c: float(row[i] / row.sum()) if row.sum() else 0.0
                                  for i, c in enumerate(CONTEXTS)}

  out_experts = []
  for x in range(num_experts):
    n_e = int(counts[x])
    tops = []
    if n_e:
      for i in np.nonzero(joint[x] >= min_count)[0]:
        ratio = (joint[x, i] / n_e) / (per_token[i] / total)
        tops.append({'id': int(i), 'text': texts[int(i)], 'class': classes[int(i)], 'count': int(joint[x, i]),
                     'base_count': int(per_token[i]), 'ratio': float(ratio)})
      tops.sort(key=lambda d: (-d['ratio'], -d['count'], d['id']))
    out_experts.append({'expert': x, 'tokens': n_e, 'load': n_e / total if total else 0.0,
                        'mean_confidence': float(conf[x] / n_e) if n_e else None,
                        'top_tokens': tops[:top], 'classes': class_shares(joint[x])})
    if contexts is not None:
      out_experts[-1]['contexts'] = context_shares(by_context[x])
  out = {'num_experts': num_experts, 'tokens': total, 'base_classes': class_shares(per_token)}
  if contexts is not None:
    out['base_contexts'] = context_shares(by_context.sum(0))
  return {**out, 'experts': out_experts}


def decoder_starts(batch: dict[str, np.ndarray]) -> np.ndarray:
  """[B, L] True where a decoder sequence starts (position 0 of each packed segment)."""
  if 'decoder_positions' in batch:
    return batch['decoder_positions'] == 0
  starts = np.zeros(batch['decoder_input_tokens'].shape, bool)
  starts[:, 0] = True
  return starts


def analyse(run: Run, max_batches: Optional[int], min_count: int = 5, top: int = 10,
            sample_tokens: int = 96) -> dict[str, Any]:
  """The whole report (JSON-able): per layer statistics and a routed text sample."""
  per_layer, batches = routing_per_token(run, run.batches(max_batches))
  if not batches:
    raise UserError(f'The {run.dataset_cfg.split!r} split of {run.dataset_cfg.mixture_or_task_name!r} gave '
                    'no batch.')
  if not per_layer:
    raise UserError('The model sowed no per-token routing: no sparse MoE layer ran.')
  report = {'checkpoint': run.checkpoint_dir, 'step': run.step, 'config': run.config_path,
            'task': run.dataset_cfg.mixture_or_task_name, 'split': run.dataset_cfg.split,
            'batches': len(batches), 'batch_size': run.dataset_cfg.batch_size,
            'vocabulary': 'byte' if _is_byte_vocabulary(run.vocabulary) else 'sentencepiece',
            'min_count': min_count, 'top': top, 'layers': {}}
  texts: dict[tuple[int, bool], str] = {}
  for layer in sorted(per_layer):
    streams = [stream_tokens(b, layer) for b in batches]
    is_encoder = layer.split('/')[0] == 'encoder'
    starts = [np.zeros_like(r) if is_encoder else decoder_starts(b) for b, (_, r) in zip(batches, streams)]
    num_experts = _num_experts(run, layer)
    contexts = [row_contexts(t, st, run.vocabulary, texts) for (t, _), st in zip(streams, starts)]
    stats = layer_statistics(per_layer[layer]['expert'], per_layer[layer]['probability'],
                             [t for t, _ in streams], [r for _, r in streams], num_experts, run.vocabulary,
                             starts, min_count=min_count, top=top, contexts=contexts)
    routed = per_layer[layer]
    stats['sample'] = text_sample(batches[0], routed['expert'][0], routed['probability'][0], layer,
                                  run.vocabulary, sample_tokens)
    report['layers'][layer] = stats
  return report


def row_contexts(tokens: np.ndarray, starts: np.ndarray, vocabulary, cache: dict) -> np.ndarray:
  """[B, L] indices into CONTEXTS of each position (token_contexts over each row)."""
  out = np.zeros(tokens.shape, np.int32)
  index = {c: i for i, c in enumerate(CONTEXTS)}
  for b in range(tokens.shape[0]):
    row = []
    for tok, start in zip(tokens[b].tolist(), starts[b].tolist()):
      key = (tok, bool(start) and tok == 0)
      if key not in cache:
        cache[key] = token_text(vocabulary, tok, decoder_start=key[1])
      row.append(cache[key])
    out[b] = [index[c] for c in token_contexts(row)]
  return out


def _num_experts(run: Run, layer: str) -> int:
  stack = layer.split('/')[0]
  moe = getattr(run.model, 'encoder_moe' if stack == 'encoder' else 'decoder_moe', None) or getattr(
      run.model, 'moe', None)
  return moe.num_experts if moe is not None else max(run.num_experts)


def text_sample(batch: dict[str, np.ndarray], experts: np.ndarray, probs: np.ndarray, layer: str, vocabulary,
                length: int) -> dict[str, list]:
  """The first `length` real positions of the batch's first row: token texts, chosen experts, probabilities."""
  tokens, real = stream_tokens(batch, layer)
  starts = (np.zeros_like(real) if layer.split('/')[0] == 'encoder' else decoder_starts(batch))
  idx = np.nonzero(real[0])[0][:length]
  return {'tokens': [token_text(vocabulary, int(tokens[0, i]), bool(starts[0, i])) for i in idx],
          'expert': [int(experts[0, i]) for i in idx], 'probability': [float(probs[0, i]) for i in idx]}


# ---------------------------------------------------------------------------------------------------------
# Writing.

def _slug(layer: str) -> str:
  return re.sub(r'[^A-Za-z0-9]+', '_', layer).strip('_')


def expert_colours(num_experts: int) -> list[tuple[float, float, float]]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  colours = []
  for name, part in _PALETTES:
    colours.extend(tuple(c[:3]) for c in matplotlib.colormaps[name].colors[part])
  if num_experts > len(colours):  # beyond 60 experts: evenly spaced hues
    cmap = matplotlib.colormaps['hsv']
    return [tuple(cmap(i / num_experts)[:3]) for i in range(num_experts)]
  return colours[:num_experts]


def write_heatmap(path: str, layer: str, stats: dict[str, Any]) -> None:
  """Experts (rows) × sample positions (columns): the chosen expert's cell in its colour, shaded by the
  router's top-1 probability; the tokens label the columns."""
  # A Figure of its own, not pyplot: no backend is chosen or changed (a notebook keeps its inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  sample, num_experts = stats['sample'], stats['num_experts']
  colours = expert_colours(num_experts)
  n = len(sample['tokens'])
  image = np.ones((num_experts, max(n, 1), 3))
  for pos, (e, p) in enumerate(zip(sample['expert'], sample['probability'])):
    shade = 0.35 + 0.65 * p  # low confidence is paler
    image[e, pos] = 1.0 - shade * (1.0 - np.asarray(colours[e]))
  fig = Figure(figsize=(min(2 + 0.16 * n, 40), 1.2 + 0.3 * num_experts))
  ax = fig.subplots()
  ax.imshow(image, aspect='auto', interpolation='nearest')
  ax.set_yticks(range(num_experts))
  ax.set_yticklabels([f'expert {e}' for e in range(num_experts)], fontsize=7)
  ax.set_xticks(range(n))
  ax.set_xticklabels([display(t) for t in sample['tokens']], fontsize=6, rotation=90, family='monospace')
  ax.set_title(f'{layer}: top-1 expert per token (shade: router probability)', fontsize=9)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  with fileio.open(path, 'wb') as f:
    f.write(buffer.getvalue())


def write_html(path: str, layer: str, stats: dict[str, Any], report: dict[str, Any]) -> None:
  """The sample's text, every token on the background of its expert's colour, with a legend."""
  colours = expert_colours(stats['num_experts'])
  hexes = ['#%02x%02x%02x' % tuple(int(255 * (0.45 + 0.55 * c)) for c in col) for col in colours]
  sample = stats['sample']
  spans = []
  for text, e, p in zip(sample['tokens'], sample['expert'], sample['probability']):
    shown = text if not text.startswith('<') else f'⟨{text[1:-1]}⟩'
    title = f'expert {e}, p={p:.2f}, {display(text)}'
    body = html.escape(shown).replace('\n', '↵\n')
    spans.append(f'<span class="t" style="background:{hexes[e]}" title="{html.escape(title)}">{body}</span>')
  legend = ''.join(
      f'<span class="t" style="background:{hexes[ex["expert"]]}">expert {ex["expert"]}: load '
      f'{ex["load"]:.1%}</span> ' for ex in stats['experts'])
  page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(layer)}: tokens by expert</title>
<style>body{{font-family:sans-serif}} pre{{white-space:pre-wrap;line-height:1.6}}
.t{{font-family:monospace;padding:1px 0;border-radius:2px}}</style></head>
<body><h2>{html.escape(layer)}: each token coloured by its top-1 expert</h2>
<p>{html.escape(report['checkpoint'])} (step {report['step']}), {html.escape(report['task'])}
({html.escape(report['split'])}), the first {len(sample['tokens'])} tokens of a sample. Hover a token for
its expert and router probability.</p>
<p>{legend}</p>
<pre>{''.join(spans)}</pre>
</body></html>
"""
  _write_utf8(path, page)


def markdown(report: dict[str, Any]) -> str:
  lines = [f'# Expert specialisation: {report["checkpoint"]} (step {report["step"]})', '',
           f'{report["task"]} ({report["split"]}), {report["batches"]} batches of {report["batch_size"]}; '
           f'{report["vocabulary"]} vocabulary. Top tokens: ratio of the token\'s rate among the expert\'s '
           f'tokens to its base rate, tokens the expert received at least {report["min_count"]} times.', '']
  for layer, stats in report['layers'].items():
    base = stats['base_classes']
    lines += [f'## {layer} ({stats["tokens"]:,} tokens)', '',
              'base classes: ' + ', '.join(f'{c} {base[c]:.0%}' for c in CLASSES if base[c] > 0), '',
              'base contexts: ' + ', '.join(f'{c} {v:.0%}' for c, v in stats['base_contexts'].items()
                                            if v > 0), '',
              '| expert | load | mean confidence | main class (share / base) | main context (share / base) '
              '| top tokens (ratio) |',
              '|---:|---:|---:|---|---|---|']
    for ex in stats['experts']:
      conf = '—' if ex['mean_confidence'] is None else f'{ex["mean_confidence"]:.3f}'
      lift = {c: ex['classes'][c] / base[c] for c in CLASSES if base[c] >= 0.01 and ex['tokens']}
      main = max(lift, key=lift.get) if lift else None
      main_text = f'{main} ({ex["classes"][main]:.0%} / {base[main]:.0%})' if main else '—'
      main_context = _main_lift(ex['contexts'], stats['base_contexts']) if ex['tokens'] else '—'
      tops = ' '.join(f'`{display(t["text"])}`×{t["ratio"]:.1f}' for t in ex['top_tokens']) or '—'
      lines.append(f'| {ex["expert"]} | {ex["load"]:.1%} | {conf} | {main_text} | {main_context} | {tops} |')
    lines.append('')
  return '\n'.join(lines)


def _main_lift(shares: dict[str, float], base: dict[str, float]) -> str:
  """The class whose share most exceeds its base share (classes of at least 1% of the base)."""
  lift = {c: shares[c] / base[c] for c in base if base[c] >= 0.01}
  if not lift:
    return '—'
  main = max(lift, key=lift.get)
  return f'{main} ({shares[main]:.0%} / {base[main]:.0%})'


def _write_utf8(path: str, text: str) -> None:
  with fileio.open(path, 'w', encoding='utf-8') as f:  # '␣', '—', '↵' whatever the locale
    f.write(text)


def write_outputs(report: dict[str, Any], out_dir: str) -> str:
  fileio.makedirs(out_dir)
  for layer, stats in report['layers'].items():
    files = {'heatmap': f'heatmap_{_slug(layer)}.png', 'html': f'routing_{_slug(layer)}.html'}
    write_heatmap(fileio.join(out_dir, files['heatmap']), layer, stats)
    write_html(fileio.join(out_dir, files['html']), layer, stats, report)
    stats['files'] = files
  text = markdown(report)
  fileio.write_text(fileio.join(out_dir, 'expert_analysis.json'), json.dumps(report, indent=1))
  _write_utf8(fileio.join(out_dir, 'expert_analysis.md'), text + '\n')
  return text


# ---------------------------------------------------------------------------------------------------------
# Entry point.

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description='What the experts of an MoE checkpoint specialise in.')
  parser.add_argument('--checkpoint', required=True,
                      help='a MODEL_DIR (its latest checkpoint) or a checkpoint_<step> folder')
  parser.add_argument('--out_dir', default=None, help='default: MODEL_DIR/expert_analysis')
  parser.add_argument('--batches', type=int, default=20, help='validation batches to route (default 20)')
  parser.add_argument('--task', default=None, help='default: the run\'s MIXTURE_OR_TASK_NAME')
  parser.add_argument('--split', default='validation')
  parser.add_argument('--min_count', type=int, default=5,
                      help='a top token must reach the expert at least this often (default 5)')
  parser.add_argument('--top', type=int, default=10, help='top tokens per expert (default 10)')
  parser.add_argument('--sample_tokens', type=int, default=96, help='tokens in the heat map / HTML sample')
  parser.add_argument('--debug', action='store_true', help='show the stack trace of bad-input errors')
  return parser.parse_args(argv)


def run_analysis(args: argparse.Namespace, print_fn=print) -> dict[str, Any]:
  if args.batches is not None and args.batches <= 0:
    raise UserError(f'--batches {args.batches} must be a positive number of batches.')
  if args.min_count < 1 or args.top < 1 or args.sample_tokens < 1:
    raise UserError('--min_count, --top and --sample_tokens must be positive.')
  run = Run(args.checkpoint, task=args.task, split=args.split)
  out_dir = args.out_dir or fileio.join(run.model_dir, 'expert_analysis')
  try:
    fileio.makedirs(out_dir)
    with fileio.probe_file(out_dir):
      pass
  except OSError as e:
    raise UserError(f'--out_dir {out_dir} is not writable: {e.strerror or e}.') from e
  report = analyse(run, args.batches, min_count=args.min_count, top=args.top,
                   sample_tokens=args.sample_tokens)
  report['out_dir'] = fileio.absolute(out_dir)
  print_fn(write_outputs(report, out_dir))
  print_fn(f'Wrote {fileio.join(out_dir, "expert_analysis.json")}, expert_analysis.md and a heat map PNG '
           f'and HTML page per layer ({len(report["layers"])} layers).')
  return report


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
  argv = sys.argv[1:] if argv is None else list(argv)
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax's metadata warnings, as the entry points
  debug = '--debug' in argv or os.environ.get('ST_MOE_DEBUG') == '1'
  from tasks import common  # pylint: disable=g-import-not-at-top
  try:
    return run_analysis(parse_args(argv))
  except (UserError, common.TaskInputError, ckpt_lib.CheckpointShapeError) as e:
    if debug:
      raise
    message = ' '.join(line.strip() for line in str(e).splitlines()
                       if not line.strip().startswith('In call to configurable'))
    print(f'ERROR: {message}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
