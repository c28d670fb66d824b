"""compile_tpu: the real train and eval steps compiled for a TPU slice on this CPU host (libtpu describes the
chips; nothing runs on them). One tiny compile is shared by the tests (a module fixture)."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from st_moe_jax import cli
from st_moe_jax import compile_tpu
from st_moe_jax import partitioning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = 'v5p:2x2x2'  # 8 chips
# Two data replicas of 4 expert shards: NUM_EXPERT_REPLICAS = 2 from the mesh, so G is a multiple of 4 x 2 and
# the groups split over the 8 batch shards (with G = 4, as before, XLA gathered tokens: no all-to-all).
MESH = 'data:2,expert:4,model:1'
# st_moe_tiny, smaller still, in bfloat16 (the float32 gradient reduction is checked on its HLO).
TINY = ['--gin_file=gin/runs/pretrain.gin', '--gin_file=gin/models/st_moe_tiny.gin',
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 32}", '--gin.BATCH_SIZE=16',
        '--gin.EMBED_DIM=32', '--gin.MLP_DIM=48', '--gin.NUM_HEADS=2', '--gin.HEAD_DIM=16',
        '--gin.NUM_EXPERTS=4', '--gin.EXPERT_MLP_DIM=32', "--gin.ACTIVATION_DTYPE='bfloat16'"]

libtpu = pytest.importorskip('libtpu', reason='libtpu (requirements-test.txt) compiles for TPU topologies')


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  """compile_tpu's main on TINY (the JSON it writes, plus the HLO texts from the same compile)."""
  out = tmp_path_factory.mktemp('compile') / 'report.json'
  kept = {}
  original = compile_tpu.compile_report

  def keep_hlo(*args, **kwargs):
    kept.update(original(*args, **kwargs, keep_hlo=True))
    return {k: v for k, v in kept.items() if k != 'hlo'}

  cwd = os.getcwd()
  os.chdir(REPO)
  compile_tpu.compile_report = keep_hlo
  try:
    compile_tpu.main([*TINY, f'--topology={TOPOLOGY}', f'--mesh={MESH}', f'--json_out={out}'])
  finally:
    compile_tpu.compile_report = original
    os.chdir(cwd)
  with open(out) as f:
    data = json.load(f)
  return data, kept['hlo']


def test_tests_run_on_cpu_with_libtpu_installed():
  assert jax.default_backend() == 'cpu'
  assert {d.platform for d in jax.devices()} == {'cpu'}


def test_report_fields_and_memory(report):
  data, _ = report
  for key in ('topology', 'num_chips', 'mesh', 'fits', 'hbm_bytes_per_chip', 'bytes_per_chip', 'flops_per_step',
              'model_flops_per_step', 'model_flops_per_token', 'collectives', 'estimate', 'verdict'):
    assert key in data, key
  assert data['topology'] == TOPOLOGY and data['num_chips'] == 8
  assert data['mesh'] == {'data': 2, 'expert': 4, 'model': 1} and data['num_expert_replicas'] == [2]
  assert data['hbm_bytes_per_chip'] == 95 * 2**30 and data['fits'] is True
  mem = data['bytes_per_chip']
  assert set(mem) >= {'arguments', 'outputs', 'temporaries', 'total'}
  assert mem['arguments'] > 0 and mem['temporaries'] > 0 and 0 < mem['total'] < data['hbm_bytes_per_chip']
  assert data['flops_per_step'] == pytest.approx(8 * data['flops_per_chip'])
  # The compiled step computes capacity slots and more; the config's count is the useful work.
  assert 0.5 < data['flops_per_step'] / data['model_flops_per_step'] < 3
  est = data['estimate']
  assert 'ESTIMATE' in est['label'] and est['step_time_s'] > 0 and 0 < est['mfu'] < 1
  assert set(est['assumptions']) >= {'peak_bf16_flops_per_chip', 'hbm_bytes_per_s_per_chip',
                                     'ici_bytes_per_s_per_chip'}
  assert data['verdict'].startswith('FITS')


def test_expert_partitioning_gives_all_to_alls(report):
  data, hlo = report
  assert data['collectives']['all-to-all']['count'] > 0
  assert data['collectives']['all-to-all']['bytes_per_chip'] > 0
  assert ' all-to-all(' in hlo['train']


def _shapes(hlo_text):
  return {tuple(int(d) for d in dims.split(',') if d) for dims in re.findall(r'\b[a-z]+[0-9]*\[([0-9,]+)\]',
                                                                               hlo_text)}


def test_gather_dispatch_has_no_one_hot_buffer(report):
  """The default (gather) dispatch never builds the [G, T, E, C] one-hot dispatch / combine tensor (whole or
  per chip; also flattened to [G·T, E·C]): only the einsum reference path does. The per-chip expert buffers
  [E/4, G·C/2, H] it does build are found, so the sizes below are the layer's."""
  data, hlo = report
  shapes = _shapes(hlo['train'])
  experts, hidden, replicas = 4, 32, data['mesh']['data']
  for tokens in (16 * 64, 16 * 32):  # encoder, decoder: batch x length (GROUP_SIZE 1024)
    groups = experts * replicas  # the smallest multiple of E x replicas
    per_group = tokens // groups
    capacity = max(round(1.25 * per_group / experts), 4)  # routing.expert_capacity, train factor 1.25
    assert (1, groups * capacity // replicas, hidden) in shapes, capacity
    for g in {groups, groups // 8}:
      for shape in [(g, per_group, experts, capacity), (g * per_group, experts * capacity)]:
        assert shape not in shapes, shape


def test_routing_stays_local_to_its_group_shard(report):
  """No router tensor crosses chips: no all-gather of a [G, T, E] / [E, T] array (moe.per_group_shard;
  tests/test_local_routing.py checks the same on the simulated CPU mesh, where it failed before), and each
  chip's routing top-k works on its own G / 8 groups."""
  from test_local_routing import gathered_router_tensors
  _, hlo = report
  experts, groups, shards = 4, 8, 8  # G = E x 2 replicas; 8 batch shards
  for tokens in (16 * 64 // groups, 16 * 32 // groups):  # encoder, decoder tokens per group
    assert not gathered_router_tensors(hlo['train'], tokens, experts)
  local_elements = 16 * 64 // shards * experts  # a chip's encoder tokens x E
  top_k = [line for line in hlo['train'].splitlines() if re.search(r'\s(sort|custom-call)\(', line)
           and 'top_k' in line]
  assert top_k
  for line in top_k:
    for dims in re.findall(r'\[([0-9,]+)\]', line.split('=', 1)[1].split('(', 1)[0]):
      assert np.prod([int(d) for d in dims.split(',')]) <= local_elements, line[:200]


def test_dense_gradients_are_reduced_in_float32(report):
  """The bfloat16 model's kernel gradients are summed across chips in float32 (layers.cast_matmul): no
  all-reduce / reduce-scatter of a bf16 array of a kernel's shape."""
  _, hlo = report
  reductions = [line for line in hlo['train'].splitlines()
                if re.search(r'\s(all-reduce|reduce-scatter|all-reduce-start)\(', line)]
  assert reductions
  kernel_shapes = {(32, 2, 16), (2, 16, 32), (32, 48), (48, 32), (384, 32), (32, 384)}
  float32_kernels = set()
  for line in reductions:
    shape_part = line.split('=', 1)[1].split(' all-', 1)[0].split(' reduce-scatter', 1)[0]
    for dtype, dims in re.findall(r'\b([a-z]+[0-9]*)\[([0-9,]+)\]', shape_part):
      shape = tuple(int(d) for d in dims.split(','))
      if shape in kernel_shapes:
        assert dtype == 'f32', line[:300]
        float32_kernels.add(shape)
  assert float32_kernels  # the gradient reduction was found


def test_hlo_collective_parser():
  text = '\n'.join([
      '  %all-to-all.1 = bf16[4,8]{1,0} all-to-all(%x), channel_id=1',
      '  %ragged_all_to_all.5 = f32[64,1,128]{2,1,0:T(1,128)} ragged-all-to-all(%a, %b, %c, %d, %e, %f)',
      '  %ar = (f32[2,3]{1,0}, /*index=1*/bf16[5]{0}) all-reduce(%a, %b), channel_id=2',
      '  %ag-start = (f32[2], f32[8]) all-gather-start(%y)',
      '  %ag-done = f32[8]{0} all-gather-done(%ag-start)',
      '  ROOT %cp = s32[3]{0} collective-permute(%z)',
      '  %f = f32[3] add(%p, %q), metadata={op_name="all-reduce(x)"}',
  ])
  out = compile_tpu.hlo_collectives(text)
  assert out['all-to-all'] == {'count': 1, 'bytes_per_chip': 64, 'dtypes': {'bf16': 1}}
  assert out['ragged-all-to-all'] == {'count': 1, 'bytes_per_chip': 64 * 128 * 4, 'dtypes': {'f32': 1}}
  assert out['all-reduce']['count'] == 1 and out['all-reduce']['bytes_per_chip'] == 24 + 10
  assert out['all-gather'] == {'count': 1, 'bytes_per_chip': 32, 'dtypes': {'f32': 1}}
  assert out['collective-permute']['bytes_per_chip'] == 12
  assert out['reduce-scatter']['count'] == 0


def test_model_flops_formula():
  """A dense 1-layer decoder-only model: 6 · params · tokens + 12 · L² · heads · head_dim per sequence."""
  from st_moe_jax import models
  from st_moe_jax.config import TransformerConfig
  cfg = TransformerConfig(vocab_size=128, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                          num_encoder_layers=0, num_decoder_layers=1, activations=('relu',))
  flops = compile_tpu.model_flops_per_step(models.DecoderOnly(cfg), {'targets': 10}, 3)
  params = 4 * 16 * 16 + 2 * 16 * 32 + 16 * 128
  assert flops['matmul'] == 6 * params * 30
  assert flops['attention'] == 12 * 3 * 16 * 10 * 10
  assert flops['total'] == flops['matmul'] + flops['attention']


@pytest.mark.parametrize('extra, expected', [
    (['--topology=v7:2x2'], 'Unknown TPU topology'),
    (['--topology=v5p:2x2'], 'v5p:AxBxC'),
    ([], '--topology is required'),
    (['--topology=v5p:2x2x1', '--mesh=data:2,expert:4,model:1'], 'must multiply to 4'),
    (['--topology=v5p:2x2x1', '--mesh=data:1,expert:4', '--gin.NUM_EXPERTS=6'],
     'NUM_EXPERTS=6 is not divisible'),
    (['--topology=v5p:2x2x1', '--mesh=experts:4'], 'expected data:D,expert:E,model:M'),
])
def test_bad_input_is_a_one_line_error(cli_error, extra, expected):
  err = cli_error([*TINY, *extra], main=compile_tpu.main)
  assert expected in err, err
  assert len(err.strip().splitlines()) == 1, err


def test_parse_topology_forms():
  assert compile_tpu.parse_topology('v4:4x4x8') == ('v4', (4, 4, 8))
  assert compile_tpu.parse_topology('v6e:16x16') == ('v6e', (16, 16))
  with pytest.raises(cli.UserError, match='v5e:AxB'):
    compile_tpu.parse_topology('v5e:2x2x2')


# ---------------------------------------------------------------------------------------------------------
# NUM_EXPERT_REPLICAS from the mesh (8 simulated CPU devices).

@pytest.mark.parametrize('shape', [(2, 4, 1), (4, 2, 1)])
def test_expert_replicas_follow_the_mesh(shape):
  from st_moe_jax import gin_setup
  from st_moe_jax import moe as moe_lib
  data, expert, model_parts = shape
  gin_setup.parse_model_gin([os.path.join(REPO, 'gin/models/st_moe_tiny.gin')], search_paths=(REPO,))
  model = gin_setup.architecture()
  mesh = cli.create_mesh(expert, model_parts, model, jax.devices()[:8])
  assert tuple(mesh.shape.values()) == shape
  derived = cli.with_expert_replicas(model, mesh)
  assert partitioning.num_expert_replicas(mesh) == data
  for moe in cli.moe_configs(derived):
    assert moe.num_expert_replicas == data
    multiple = moe.num_experts * moe.num_expert_replicas
    groups, _, _ = moe_lib.plan_groups(32, 64, moe.group_size, multiple)
    assert groups % multiple == 0
    # The groups split evenly over the ('expert', 'data') batch shards.
    assert groups % (data * expert) == 0
  # A value set by hand is kept.
  hand = model.clone(encoder_moe=dataclasses.replace(model.encoder_moe, num_expert_replicas=3))
  assert cli.with_expert_replicas(hand, mesh).encoder_moe.num_expert_replicas == 3


def test_grouped_matmul_auto_follows_the_compile_target():
  """'auto' picks by the mesh's devices (TPU here), not the host's backend (CPU)."""
  from jax.sharding import Mesh
  from st_moe_jax import dispatch
  seen = {}

  def probe(x):
    seen['platform'] = dispatch.target_platform()
    return x

  tpu = compile_tpu.topology_devices('v5p:2x2x1')
  with jax.set_mesh(Mesh(np.asarray(tpu).reshape(4), ('data',))):
    jax.jit(probe).lower(jax.ShapeDtypeStruct((4,), np.float32))
  assert seen['platform'] == 'tpu'
  jax.jit(probe).lower(jax.ShapeDtypeStruct((4,), np.float32))
  assert seen['platform'] == 'cpu'


def test_verdict_says_by_how_much_and_what_dominates():
  gib = 2**30
  report = {'bytes_per_chip': {'total': 40 * gib, 'temporaries': 30 * gib}, 'hbm_bytes_per_chip': 32 * gib,
            'fits': False, 'resident_bytes_per_chip': {'params': 8 * gib, 'optimizer_state': gib, 'batch': 0},
            'largest_arrays_per_chip': [("['params']['logits_dense']['kernel']", 2 * gib)]}
  line = compile_tpu.verdict(report)
  assert line.startswith('DOES NOT FIT: 40.00 GiB per chip > 32 GiB HBM, over by 8.00 GiB (1.25x)'), line
  assert line.index('temporaries 30.00 GiB') < line.index('params 8.00 GiB') and 'logits_dense' in line


def test_a_step_that_does_not_fit_exits_3_after_the_report(report, tmp_path, monkeypatch, capsys):
  """The report (printed and JSON) comes out first; the status then tells a sweep's script the verdict."""
  data, _ = report
  over = {**data, 'fits': False, 'hbm_bytes_per_chip': data['bytes_per_chip']['total'] // 2}
  over['verdict'] = compile_tpu.verdict(over)
  monkeypatch.setattr(compile_tpu, 'compile_report', lambda *args, **kwargs: over)
  monkeypatch.chdir(REPO)
  out = tmp_path / 'report.json'
  with pytest.raises(SystemExit) as exit_info:
    compile_tpu.main([*TINY, f'--topology={TOPOLOGY}', f'--mesh={MESH}', f'--json_out={out}'])
  assert exit_info.value.code == compile_tpu.EXIT_DOES_NOT_FIT == 3
  assert 'DOES NOT FIT' in capsys.readouterr().out
  assert json.loads(out.read_text())['fits'] is False


# The TPU compiler's own refusal, as libtpu 0.0.42 words it (st_moe_32b on v4:4x4x8, mesh 1×8×16).
OOM = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (32.29G) '
       'exceeds available HBM (30.75G).')


def test_out_of_memory_temporaries_reads_the_compilers_figure():
  assert compile_tpu.out_of_memory_temporaries(OOM) == int(32.29 * 2**30)
  assert compile_tpu.out_of_memory_temporaries('INTERNAL: something else') is None


def test_a_step_the_compiler_refuses_is_reported_as_not_fitting(tmp_path, monkeypatch, capsys):
  """Where XLA itself stops (temporaries over HBM), the report still says by how much and what dominates."""
  from st_moe_jax import trainer as trainer_lib

  class Refused:
    def compile(self):
      raise jax.errors.JaxRuntimeError(OOM)

  monkeypatch.setattr(trainer_lib.Trainer, 'lower_steps', lambda self: (Refused(), Refused()))
  monkeypatch.chdir(REPO)
  out = tmp_path / 'report.json'
  with pytest.raises(SystemExit) as exit_info:
    compile_tpu.main([*TINY, f'--topology={TOPOLOGY}', f'--mesh={MESH}', f'--json_out={out}'])
  assert exit_info.value.code == 3
  printed = capsys.readouterr().out
  assert 'the TPU compiler stopped: RESOURCE_EXHAUSTED' in printed
  data = json.loads(out.read_text())
  assert data['fits'] is False and data['bytes_per_chip']['temporaries'] == int(32.29 * 2**30)
  assert data['bytes_per_chip']['total'] == data['bytes_per_chip']['temporaries'] + sum(
      data['resident_bytes_per_chip'].values())
  assert data['verdict'].startswith('DOES NOT FIT') and 'temporaries 32.29 GiB' in data['verdict']
