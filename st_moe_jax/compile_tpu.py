r"""Compile the real train and eval steps for a TPU slice on any host, without a TPU (MaxText's
train_compile.py idea): libtpu (requirements-test.txt) describes the slice's chips, the steps are lowered
with abstract parameters and batch (jax.ShapeDtypeStruct with NamedShardings; no weights are allocated)
and compiled ahead of time. The report gives per-chip memory against the chip's HBM, FLOPs, every
collective of the optimized HLO, and a roofline ESTIMATE of the step time and MFU (never a measurement).

  python -m st_moe_jax.compile_tpu --gin_file=gin/runs/pretrain.gin --gin_file=gin/models/st_moe_small.gin \
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 512, 'targets': 114}" --gin.BATCH_SIZE=128 \
      --topology=v5p:2x2x2 [--mesh=data:2,expert:4,model:1] [--json_out=report.json]

Flags are train.py's (cli.py); MODEL_DIR, TRAIN_STEPS and MIXTURE_OR_TASK_NAME may be left out (nothing is
trained or read). Without --mesh the mesh is train's: NUM_EXPERT_PARTITIONS / NUM_MODEL_PARTITIONS over
the slice's chips. The model's groups follow the mesh as in training (NUM_EXPERT_REPLICAS from the mesh,
cli.with_expert_replicas). docs/tpu_compile.md has the figures and the commands that made them.
"""

import st_moe_jax  # pylint: disable=g-bad-import-order  (first: TensorFlow's start-up lines are dropped)
st_moe_jax.import_tensorflow_quietly()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import math
import os
import re
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import gin

from st_moe_jax import cli
from st_moe_jax import data as data_lib
from st_moe_jax import losses
from st_moe_jax import models
from st_moe_jax import trainer as trainer_lib

# libtpu loads lazily (at the first topology); before that: a process that only compiles needs no TPU VM
# metadata, and must not take libtpu's one-process-per-host lock (/tmp/libtpu_lockfile), which a running
# training job, a second compile or a parallel test worker may hold.
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

GIB = 1024 ** 3

# Per-chip figures of each TPU generation, from Cloud TPU's system-architecture pages (bf16 dense peak, HBM
# capacity and bandwidth, inter-chip interconnect bandwidth per chip). They are the assumptions of the
# estimate and are printed beside it. v4 and v5p chips are compiled as megacore (one device per chip).
CHIPS = {
    'v4': dict(hbm_gib=32, peak_bf16_flops=275e12, hbm_bytes_per_s=1.2e12, ici_bytes_per_s=300e9,
               megacore=True),
    'v5e': dict(hbm_gib=16, peak_bf16_flops=197e12, hbm_bytes_per_s=819e9, ici_bytes_per_s=200e9,
                megacore=False),
    'v5p': dict(hbm_gib=95, peak_bf16_flops=459e12, hbm_bytes_per_s=2.765e12, ici_bytes_per_s=600e9,
                megacore=True),
    'v6e': dict(hbm_gib=32, peak_bf16_flops=918e12, hbm_bytes_per_s=1.64e12, ici_bytes_per_s=448e9,
                megacore=False),
}
_TOPOLOGY = re.compile(r'(v4|v5e|v5p|v6e):([1-9]\d*(?:x[1-9]\d*){1,2})')
TOPOLOGY_FORMS = ('v4:AxBxC, v5p:AxBxC (3-D torus, e.g. v4:2x2x1, v5p:4x4x8), v5e:AxB, v6e:AxB (2-D, e.g. '
                  'v5e:16x16)')
COLLECTIVES = ('all-to-all', 'ragged-all-to-all', 'all-gather', 'reduce-scatter', 'all-reduce',
               'collective-permute')
# Training flops ≈ 3 × forward (backward = 2 × forward).
TRAIN_FLOPS_FACTOR = 3


# ---------------------------------------------------------------------------------------------------------
# Topology and mesh.

def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:2x2x2' -> ('v5p', (2, 2, 2)); UserError listing the valid forms otherwise."""
  m = _TOPOLOGY.fullmatch(name or '')
  dims = tuple(int(d) for d in m.group(2).split('x')) if m else ()
  if not m or len(dims) != (2 if m.group(1) in ('v5e', 'v6e') else 3):
    raise cli.UserError(f'Unknown TPU topology {name!r}: use one of the forms {TOPOLOGY_FORMS}.')
  return m.group(1), dims


def topology_devices(name: str) -> list[Any]:
  """The TPU devices (one per chip) of topology `name`, described by libtpu on this host."""
  generation, _ = parse_topology(name)
  try:
    from jax.experimental import topologies
    kwargs = {'chip_config_name': 'megacore'} if CHIPS[generation]['megacore'] else {}
    return list(topologies.get_topology_desc(platform='tpu', topology_name=name, **kwargs).devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing, or it refuses the shape)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise cli.UserError(f'libtpu could not describe TPU topology {name!r} ({first}). Install libtpu '
                        f'(requirements-test.txt pins it) and use one of the forms {TOPOLOGY_FORMS}.') from e


def parse_mesh(text: str) -> dict[str, int]:
  """'data:2,expert:4,model:1' -> {'data': 2, 'expert': 4, 'model': 1} (missing axes are 1)."""
  sizes = {'data': 1, 'expert': 1, 'model': 1}
  for part in text.split(','):
    name, _, value = part.partition(':')
    if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise cli.UserError(f'--mesh={text}: expected data:D,expert:E,model:M with positive whole sizes, e.g. '
                          '--mesh=data:2,expert:4,model:1.')
    sizes[name.strip()] = int(value)
  return sizes


def build_mesh(devices: Sequence[Any], mesh_flag: Optional[str], num_expert_partitions: int,
               num_model_partitions: int, model: Any):
  """train's mesh over the slice's chips, or exactly --mesh's sizes (checked against the chip count)."""
  if mesh_flag:
    sizes = parse_mesh(mesh_flag)
    product = sizes['data'] * sizes['expert'] * sizes['model']
    if product != len(devices):
      raise cli.UserError(f'--mesh={mesh_flag}: data x expert x model = {product}, but the topology has '
                          f'{len(devices)} chips; the sizes must multiply to {len(devices)}.')
    num_expert_partitions, num_model_partitions = sizes['expert'], sizes['model']
  mesh = cli.create_mesh(num_expert_partitions, num_model_partitions, model, devices)
  if mesh_flag and (mesh.shape['data'], mesh.shape['expert']) != (sizes['data'], sizes['expert']):
    raise cli.UserError(f'--mesh={mesh_flag} cannot be built over {len(devices)} chips.')
  return mesh


# ---------------------------------------------------------------------------------------------------------
# The model: abstract batch, model FLOPs.

def abstract_batch(kind: str, lengths: Mapping[str, int], batch_size: int, pack: bool) -> dict[str, Any]:
  """The converted batch (seqio's EncDec / LM feature converter) as ShapeDtypeStructs: no data pipeline."""
  import jax
  import jax.numpy as jnp
  if kind == data_lib.ENCODER_DECODER:
    features = {'encoder_input_tokens': lengths['inputs']}
    if pack:
      features.update(encoder_segment_ids=lengths['inputs'], encoder_positions=lengths['inputs'])
  else:
    features = {}
  features.update(decoder_input_tokens=lengths['targets'], decoder_target_tokens=lengths['targets'],
                  decoder_loss_weights=lengths['targets'])
  if pack:
    features.update(decoder_segment_ids=lengths['targets'], decoder_positions=lengths['targets'])
  return {k: jax.ShapeDtypeStruct((batch_size, length), jnp.int32) for k, length in features.items()}


def _stack_params_per_token(cfg: Any, moe: Any, num_layers: int, cross_attention: bool) -> tuple[int, int]:
  """(matmul parameters a token of this stack goes through, of which cross-attention K/V projections that
  run on encoder tokens instead)."""
  attn = 4 * cfg.embed_dim * cfg.num_heads * cfg.head_dim
  dense_ffn = cfg.embed_dim * cfg.mlp_dim * (len(cfg.activations) + 1)
  sparse = set(models.sparse_layer_indices(num_layers, moe.num_sparse_layers, moe.sparse_layout)
               if moe is not None else ())
  total, cross_kv = 0, 0
  for i in range(num_layers):
    total += attn
    if cross_attention:
      total += attn // 2  # q and o on decoder tokens
      cross_kv += attn // 2  # k and v on encoder tokens
    if i in sparse:
      expert_dim = moe.expert_mlp_dim or cfg.mlp_dim
      acts = moe.expert_activations or cfg.activations
      total += cfg.embed_dim * moe.num_experts  # router
      total += moe.num_selected_experts * cfg.embed_dim * expert_dim * (len(acts) + 1)
      if moe.extra_mlp:
        total += dense_ffn
    else:
      total += dense_ffn
  return total, cross_kv


def model_flops_per_step(model: Any, lengths: Mapping[str, int], batch_size: int) -> dict[str, Any]:
  """Training FLOPs of one step from the model config alone, the useful work (PaLM's MFU convention):

    6 · (active matmul parameters a token passes through) · tokens            (the dense matmuls)
    + 12 · layers · L_q · L_kv · heads · head_dim per sequence                 (attention QKᵀ and AV)

  6 = 2 (multiply-add) × 3 (forward + backward). A token's active parameters are the attention
  projections, the dense FFNs, per sparse layer the router and k experts' FFNs (k = NUM_SELECTED_EXPERTS,
  not the capacity-factor slots XLA actually computes) plus ST-MoE's extra dense FFN, and for decoder
  tokens the logits layer (embedding lookups cost nothing). Cross-attention K/V projections run on
  encoder tokens. Attention is counted over the full L_q × L_kv square (causal masking included), as the
  compiled einsums compute it.
  """
  cfg = model.config
  dims = cfg.num_heads * cfg.head_dim
  dec_len = lengths['targets']
  logits = cfg.embed_dim * cfg.vocab_size
  if isinstance(model, models.EncoderDecoder):
    enc_len = lengths['inputs']
    enc, _ = _stack_params_per_token(cfg, model.encoder_moe, cfg.num_encoder_layers, False)
    dec, cross_kv = _stack_params_per_token(cfg, model.decoder_moe, cfg.num_decoder_layers, True)
    matmul = 6 * batch_size * (enc_len * (enc + cross_kv) + dec_len * (dec + logits))
    attention = 12 * batch_size * dims * (cfg.num_encoder_layers * enc_len * enc_len
                                          + cfg.num_decoder_layers * (dec_len * dec_len + dec_len * enc_len))
  else:
    dec, _ = _stack_params_per_token(cfg, model.moe, cfg.num_decoder_layers, False)
    matmul = 6 * batch_size * dec_len * (dec + logits)
    attention = 12 * batch_size * dims * cfg.num_decoder_layers * dec_len * dec_len
  return {'total': int(matmul + attention), 'matmul': int(matmul), 'attention': int(attention)}


# ---------------------------------------------------------------------------------------------------------
# The compiled step: memory, cost, collectives.

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4,
                'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
# `%name = SHAPE op(` where op is a collective or its async -done half (whose result is the collective's).
_COLLECTIVE_LINE = re.compile(
    r'^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<shape>.*?)\s+(?P<op>all-to-all|ragged-all-to-all|all-gather|all-gather-done|'
    r'reduce-scatter|all-reduce|all-reduce-done|collective-permute|collective-permute-done)\(')


def shape_bytes(shape: str) -> tuple[int, list[str]]:
  """Bytes of an HLO shape string ('bf16[4,8]{1,0}' or a tuple of them) and its element types."""
  total, dtypes = 0, []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue
    total += math.prod(int(d) for d in dims.split(',') if d) * _DTYPE_BYTES[dtype]
    dtypes.append(dtype)
  return total, dtypes


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, Any]]:
  """{kind: {count, bytes_per_chip, dtypes}} of the collectives in an optimized (per-device) HLO module.

  bytes_per_chip is the sum of the results' sizes (each chip's share: SPMD shapes are per device; for a
  ragged-all-to-all, dropless expert parallelism's exchange, the whole receive buffer, a bound). Each
  instruction is counted once as written (the model has no loops over layers, so that is once a step).
  """
  out = {kind: {'count': 0, 'bytes_per_chip': 0, 'dtypes': {}} for kind in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _COLLECTIVE_LINE.search(line)
    if not m:
      continue
    kind = m.group('op').removesuffix('-done')
    size, dtypes = shape_bytes(m.group('shape'))
    entry = out[kind]
    entry['count'] += 1
    entry['bytes_per_chip'] += size
    for dtype in set(dtypes):
      entry['dtypes'][dtype] = entry['dtypes'].get(dtype, 0) + 1
  return out


def memory(compiled: Any) -> dict[str, int]:
  """Per-chip bytes from compiled.memory_analysis(); total = arguments + outputs − aliased (donated state
  reused for the new state) + temporaries + generated code."""
  m = compiled.memory_analysis()
  arguments, outputs = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  temporaries, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  code = int(getattr(m, 'generated_code_size_in_bytes', 0) or 0)
  return {'arguments': arguments, 'outputs': outputs, 'temporaries': temporaries, 'aliased': alias,
          'generated_code': code, 'total': arguments + outputs - alias + temporaries + code}


def cost(compiled: Any) -> dict[str, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return {'flops': float(analysis.get('flops', 0.0)),
          'bytes_accessed': float(analysis.get('bytes accessed', 0.0))}


def per_chip_bytes(tree: Any) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs."""
  import jax
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def largest_arrays(tree: Any, n: int = 3) -> list[tuple[str, int]]:
  import jax
  sizes = [(jax.tree_util.keystr(path), math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize)
           for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]
  return sorted(sizes, key=lambda s: -s[1])[:n]


def estimate(flops_per_chip: float, bytes_accessed: float, collective_bytes: int, model_flops: int,
             num_chips: int, chip: Mapping[str, Any]) -> dict[str, Any]:
  """Roofline ESTIMATE: each time is a lower bound; the step takes at least the largest of them."""
  compute_s = flops_per_chip / chip['peak_bf16_flops']
  hbm_s = bytes_accessed / chip['hbm_bytes_per_s']
  ici_s = collective_bytes / chip['ici_bytes_per_s']
  step = max(compute_s, hbm_s, ici_s)
  return {
      'label': 'ESTIMATE (roofline from the compiled HLO; not measured)',
      'step_time_s': step,
      'step_time_no_overlap_s': compute_s + hbm_s + ici_s,
      'compute_time_s': compute_s, 'hbm_time_s': hbm_s, 'ici_time_s': ici_s,
      'bound_by': max((compute_s, 'compute'), (hbm_s, 'HBM'), (ici_s, 'ICI'))[1],
      'mfu': model_flops / (num_chips * chip['peak_bf16_flops'] * step) if step else 0.0,
      'assumptions': {
          'peak_bf16_flops_per_chip': chip['peak_bf16_flops'],
          'hbm_bytes_per_s_per_chip': chip['hbm_bytes_per_s'],
          'ici_bytes_per_s_per_chip': chip['ici_bytes_per_s'],
          'notes': 'step time = max(compute, HBM, ICI): perfect overlap (no-overlap sum beside it); compute = '
                   'cost_analysis flops per chip / peak bf16 (float32 matmuls run slower than this); HBM = '
                   'cost_analysis bytes accessed / HBM bandwidth; ICI = collective result bytes per chip / '
                   'ICI bandwidth (all links together, no latency, no topology contention); MFU = '
                   'model_flops_per_step / (chips x peak x step time).',
      },
  }


# ---------------------------------------------------------------------------------------------------------
# Entry point.

def compile_report(topology: str, mesh_flag: Optional[str] = None, *, model: Any = None,
                   train_dataset_cfg: Any = None, learning_rate: Any = None, optimizer: Any = None,
                   num_expert_partitions: int = 1, num_model_partitions: int = 1, loss_config: Any = None,
                   random_seed: Optional[int] = 0, freeze_patterns: Sequence[str] = (),
                   keep_hlo: bool = False) -> dict[str, Any]:
  """Compiles the train and eval steps for `topology` and returns the report (see the module doc).

  With keep_hlo the optimized HLO texts are kept under 'hlo' {'train', 'eval'} (not written to JSON)."""
  import jax
  generation, dims = parse_topology(topology)
  chip = CHIPS[generation]
  kind = cli.model_kind(model)
  devices = topology_devices(topology)
  mesh = build_mesh(devices, mesh_flag, num_expert_partitions, num_model_partitions, model)
  model = cli.with_expert_replicas(model, mesh)
  batch_size = train_dataset_cfg.batch_size
  cli.check_batch(batch_size, mesh)
  lengths = train_dataset_cfg.task_feature_lengths
  needed = ('inputs', 'targets') if kind == data_lib.ENCODER_DECODER else ('targets',)
  if not isinstance(lengths, Mapping) or any(k not in lengths for k in needed):
    raise cli.UserError(f'TASK_FEATURE_LENGTHS={lengths!r} must give {" and ".join(needed)} lengths for this '
                        'model, e.g. --gin.TASK_FEATURE_LENGTHS="{\'inputs\': 512, \'targets\': 114}".')
  batch = abstract_batch(kind, lengths, batch_size, train_dataset_cfg.pack)
  trainer = trainer_lib.Trainer(model, optimizer, learning_rate, mesh, model_kind=kind,
                                loss_config=loss_config or trainer_lib.LossConfig(), seed=random_seed or 0,
                                freeze_patterns=freeze_patterns)
  start = time.time()
  trainer.prepare(batch)
  train_lowered, eval_lowered = trainer.lower_steps()
  state = trainer.abstract_state
  resident = {'params': per_chip_bytes(state.params), 'optimizer_state': per_chip_bytes(state.opt_state),
              'batch': per_chip_bytes(jax.tree.map(
                  lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainer.abstract_batch,
                  trainer.batch_shardings))}
  report = {
      'topology': topology,
      'chip': devices[0].device_kind,
      'num_chips': len(devices),
      'mesh': dict(mesh.shape),
      'num_expert_replicas': sorted({moe.num_expert_replicas for moe in cli.moe_configs(model)}),
      'batch_size': batch_size,
      'task_feature_lengths': dict(lengths),
      'parameters': sum(int(math.prod(x.shape)) for x in jax.tree.leaves(state.params)),
      'hbm_bytes_per_chip': chip['hbm_gib'] * GIB,
      'resident_bytes_per_chip': resident,
      'largest_arrays_per_chip': largest_arrays({'params': state.params, 'opt_state': state.opt_state}),
  }
  try:
    train_compiled = train_lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    temporaries = out_of_memory_temporaries(str(e))
    if temporaries is None:
      raise
    # The TPU compiler refuses a program whose temporaries exceed HBM: the report is what is known then.
    arguments = sum(resident.values())
    report.update(fits=False, compiler_error=str(e).splitlines()[0],
                  bytes_per_chip={'arguments': arguments, 'temporaries': temporaries,
                                  'total': arguments + temporaries},
                  compile_seconds={'train': round(time.time() - start, 1)})
    report['verdict'] = verdict(report)
    return report
  train_s = time.time() - start
  eval_compiled = eval_lowered.compile()
  eval_s = time.time() - start - train_s
  num_chips = report['num_chips']
  mem = memory(train_compiled)
  eval_mem = memory(eval_compiled)
  train_cost = cost(train_compiled)
  train_hlo, eval_hlo = train_compiled.as_text(), eval_compiled.as_text()
  collectives = hlo_collectives(train_hlo)
  collective_bytes = sum(c['bytes_per_chip'] for c in collectives.values())
  model_flops = model_flops_per_step(model, lengths, batch_size)
  report.update({
      'fits': mem['total'] <= report['hbm_bytes_per_chip'],
      'bytes_per_chip': mem,
      'eval_bytes_per_chip': eval_mem,
      'flops_per_chip': train_cost['flops'],
      'flops_per_step': train_cost['flops'] * num_chips,
      'bytes_accessed_per_chip': train_cost['bytes_accessed'],
      'model_flops_per_step': model_flops['total'],
      # per token of the batch (encoder and decoder tokens: batch x the sum of the lengths)
      'model_flops_per_token': model_flops['total'] / (batch_size * sum(lengths[k] for k in needed)),
      'model_flops_breakdown': model_flops,
      'collectives': collectives,
      'eval_collectives': hlo_collectives(eval_hlo),
      'estimate': estimate(train_cost['flops'], train_cost['bytes_accessed'], collective_bytes,
                           model_flops['total'], num_chips, chip),
      'compile_seconds': {'train': round(train_s, 1), 'eval': round(eval_s, 1)},
  })
  report['verdict'] = verdict(report)
  if keep_hlo:
    report['hlo'] = {'train': train_hlo, 'eval': eval_hlo}
  return report


def out_of_memory_temporaries(message: str) -> Optional[int]:
  """Bytes of HLO temporaries from the TPU compiler's out-of-memory error ('... required for HLO temporaries
  (32.29G) exceeds available HBM (30.75G)'), or None for another error."""
  found = re.search(r'RESOURCE_EXHAUSTED.*?temporaries \(([\d.]+)([KMGT])\)', message, re.S)
  if not found:
    return None
  return int(float(found.group(1)) * 1024 ** ('KMGT'.index(found.group(2)) + 1))


def verdict(report: Mapping[str, Any]) -> str:
  mem, hbm = report['bytes_per_chip'], report['hbm_bytes_per_chip']
  total = mem['total']
  parts = dict(report['resident_bytes_per_chip'], temporaries=mem['temporaries'])
  dominant = ', '.join(f'{k} {v / GIB:.2f} GiB' for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
  if report['fits']:
    return (f'FITS: {total / GIB:.2f} GiB of {hbm / GIB:.0f} GiB HBM per chip ({100 * total / hbm:.0f}%); '
            f'per chip: {dominant}.')
  largest = ', '.join(f'{p} {b / GIB:.2f} GiB' for p, b in report['largest_arrays_per_chip'])
  return (f'DOES NOT FIT: {total / GIB:.2f} GiB per chip > {hbm / GIB:.0f} GiB HBM, over by '
          f'{(total - hbm) / GIB:.2f} GiB ({total / hbm:.2f}x); per chip: {dominant}; largest arrays: '
          f'{largest}.')


def format_report(r: Mapping[str, Any]) -> str:
  mem = r['bytes_per_chip']
  if 'compiler_error' in r:  # the compiler stopped: no program, so no FLOPs, collectives or estimate
    return '\n'.join([
        f'topology {r["topology"]} ({r["chip"]}), {r["num_chips"]} chips, mesh {r["mesh"]}, '
        f'{r["parameters"]:,} parameters',
        f'the TPU compiler stopped: {r["compiler_error"]}',
        f'memory per chip (train step): resident {mem["arguments"] / GIB:.3f} GiB + temporaries '
        f'{mem["temporaries"] / GIB:.3f} GiB (the compiler\'s figure) = {mem["total"] / GIB:.3f} GiB of '
        f'{r["hbm_bytes_per_chip"] / GIB:.0f} GiB',
        r['verdict']])
  est = r['estimate']
  a = est['assumptions']
  lines = [
      f'topology {r["topology"]} ({r["chip"]}), {r["num_chips"]} chips, mesh {r["mesh"]}, '
      f'NUM_EXPERT_REPLICAS {r["num_expert_replicas"]}, batch {r["batch_size"]} x {r["task_feature_lengths"]}, '
      f'{r["parameters"]:,} parameters',
      f'memory per chip (train step): arguments {mem["arguments"] / GIB:.3f} GiB, outputs '
      f'{mem["outputs"] / GIB:.3f} GiB (aliased {mem["aliased"] / GIB:.3f}), temporaries '
      f'{mem["temporaries"] / GIB:.3f} GiB, total {mem["total"] / GIB:.3f} GiB of '
      f'{r["hbm_bytes_per_chip"] / GIB:.0f} GiB',
      f'eval step total per chip {r["eval_bytes_per_chip"]["total"] / GIB:.3f} GiB',
      f'FLOPs per step (compiled, all chips) {r["flops_per_step"]:.4g}; model FLOPs per step (from the config) '
      f'{r["model_flops_per_step"]:.4g} ({r["model_flops_per_token"]:.4g} per token); bytes accessed per chip '
      f'{r["bytes_accessed_per_chip"]:.4g}',
      'collectives in the train step (count, bytes per chip, dtypes):',
  ]
  for kind, c in r['collectives'].items():
    lines.append(f'  {kind:<19} {c["count"]:>5}  {c["bytes_per_chip"] / 2**20:>10.2f} MiB  {c["dtypes"]}')
  lines += [
      f'{est["label"]}: step time {est["step_time_s"] * 1e3:.2f} ms ({est["bound_by"]}-bound; compute '
      f'{est["compute_time_s"] * 1e3:.2f} ms, HBM {est["hbm_time_s"] * 1e3:.2f} ms, ICI '
      f'{est["ici_time_s"] * 1e3:.2f} ms; no overlap {est["step_time_no_overlap_s"] * 1e3:.2f} ms), MFU '
      f'{100 * est["mfu"]:.1f}%',
      f'  assuming per chip: peak bf16 {a["peak_bf16_flops_per_chip"] / 1e12:.0f} TFLOP/s, HBM '
      f'{a["hbm_bytes_per_s_per_chip"] / 1e9:.0f} GB/s, ICI {a["ici_bytes_per_s_per_chip"] / 1e9:.0f} GB/s; '
      f'{a["notes"]}',
      f'compile time: train {r["compile_seconds"]["train"]} s, eval {r["compile_seconds"]["eval"]} s',
      r['verdict'],
  ]
  return '\n'.join(lines)


# Exit status when the step does not fit in HBM (2 is bad input, as in the other entry points).
EXIT_DOES_NOT_FIT = 3

# Macros the run files leave REQUIRED that a compile does not need.
REQUIRED_DEFAULTS = {'MODEL_DIR': 'None', 'TRAIN_STEPS': '1', 'MIXTURE_OR_TASK_NAME': "'compile_only'"}


def _add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--topology', default=None, help=f'TPU slice: {TOPOLOGY_FORMS}')
  parser.add_argument('--mesh', default=None, help='data:D,expert:E,model:M (default: as train derives it)')
  parser.add_argument('--json_out', default=None, help='write the report here as JSON')


def _main(flags: argparse.Namespace) -> None:
  if not flags.topology:
    raise cli.UserError(f'--topology is required: one of the forms {TOPOLOGY_FORMS}.')
  parse_topology(flags.topology)
  from st_moe_jax import train as train_lib  # registers train_script.train
  del train_lib
  try:
    bindings = cli.call_configurable(lambda: gin.get_bindings('train_script.train'), 'train')
  except (ValueError, KeyError) as e:
    raise cli.UserError('compile_tpu needs a training run gin file (gin/runs/pretrain.gin or '
                        f'finetune.gin) that configures train_script.train ({e}).') from e
  loss_config = trainer_lib.LossConfig(
      bindings.get('z_loss', losses.Z_LOSS), bindings.get('label_smoothing', 0.0),
      bindings.get('aux_loss_factor', losses.AUX_LOSS_FACTOR),
      bindings.get('router_z_loss_factor', losses.ROUTER_Z_LOSS_FACTOR),
      bindings.get('loss_normalizing_factor'))
  from st_moe_jax import optim
  report = compile_report(
      flags.topology, flags.mesh, model=bindings['model'], train_dataset_cfg=bindings['train_dataset_cfg'],
      learning_rate=bindings['learning_rate'], optimizer=bindings.get('optimizer', optim.adafactor),
      num_expert_partitions=bindings.get('num_expert_partitions', 1),
      num_model_partitions=bindings.get('num_model_partitions', 1), loss_config=loss_config,
      random_seed=bindings.get('random_seed', 0), freeze_patterns=bindings.get('freeze_patterns', ()))
  print(format_report(report), flush=True)
  if flags.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(flags.json_out)), exist_ok=True)
    with open(flags.json_out, 'w') as f:
      json.dump(report, f, indent=1)
  if not report['fits']:
    sys.exit(EXIT_DOES_NOT_FIT)  # the report is out; a sweep's script sees the verdict in the status too


def main(argv: Optional[Sequence[str]] = None) -> None:
  cli.run_main(_main, 'AOT-compile the train and eval steps for a TPU slice (no TPU needed).', argv,
               add_flags=_add_flags, required_defaults=REQUIRED_DEFAULTS)


if __name__ == '__main__':
  main(sys.argv[1:])
