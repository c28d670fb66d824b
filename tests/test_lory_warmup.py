"""Lory's dense warm-up (lory_warmup.fit_with_dense_warmup): the plan and its errors, the switch (every expert a
copy of the dense FFN, the same function), training on after it, resuming across it, and the gin run file."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK, LENGTHS, BATCH = 'stdlib_lm', {'targets': 32}, 8
FFN = ('wi_0', 'wi_1', 'wo')


def lory_model(**moe):
  from st_moe_jax import models
  config = models.TransformerConfig(vocab_size=264, embed_dim=32, num_heads=2, head_dim=16, mlp_dim=48,
                                    num_decoder_layers=2)
  return models.DecoderOnly(config, models.MoeConfig(**{
      'num_sparse_layers': 2, 'num_experts': 4, 'moe_type': 'lory', 'segment_length': 8, **moe}))


def make_trainer(model, learning_rate=None):
  import jax
  from st_moe_jax import data, optim, partitioning, trainer
  mesh = partitioning.create_mesh(jax.devices()[:1], num_expert_partitions=1)
  return trainer.Trainer(model, optim.adafactor, learning_rate or optim.constant_schedule(0.01), mesh,
                         model_kind=data.DECODER_ONLY, seed=0)


def make_data():
  from st_moe_jax import data
  cfg = data.DatasetConfig(TASK, LENGTHS, split='train', batch_size=BATCH, seed=0, num_epochs=None,
                           shuffle=True)
  return data.DataIterator(data.get_dataset(cfg, data.DECODER_ONLY, report_trimming=False))


def run_with_warmup(model_dir, train_steps, warmup, learning_rate=None, lines=None):
  """fit_with_dense_warmup to train_steps (resuming from model_dir); checkpoints at the switch and the end."""
  from st_moe_jax import lory_warmup, trainer
  model = lory_model()
  loop = trainer.LoopConfig(train_steps, BATCH, log_period=1, eval_period=1000, checkpoint_period=1000)
  return lory_warmup.fit_with_dense_warmup(
      make_trainer(warmup.dense_model, learning_rate), make_trainer(model, learning_rate), warmup, model_dir,
      make_data(), loop, print_fn=(lines.append if lines is not None else lambda _: None))


def params_at(model_dir, step):
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(os.path.join(model_dir, f'checkpoint_{step}', 'params'))


def flat(tree):
  from st_moe_jax import checkpoint_manager
  return checkpoint_manager.flat_paths(tree)


def losses_of(lines):
  return {int(m.group(1)): float(m.group(2)) for line in lines
          if (m := re.match(r'step\s+(\d+)/\d+\s+loss (\S+)', line))}


# ---------------------------------------------------------------------------------------------------------
# The plan and its errors (no training).

def test_dense_warmup_steps():
  from st_moe_jax import lory
  assert lory.dense_warmup_steps(0.05, 1000) == 50
  assert lory.dense_warmup_steps(0.0, 1000) == 0
  assert lory.dense_warmup_steps(0.05, 10) == 1  # round(0.5) is 0, but a warm-up has at least one step
  assert lory.dense_warmup_steps(0.29, 100) == 29  # rounded, not truncated (0.29 · 100 = 28.999...)
  for bad in (1.0, 1.5, -0.1, '0.05', True, None):
    with pytest.raises(ValueError, match=r'in \[0, 1\)'):
      lory.dense_warmup_steps(bad, 100)
  with pytest.raises(ValueError, match='leaves no step for the Lory model'):
    lory.dense_warmup_steps(0.9, 2)


def test_warmup_plan_and_config_errors():
  from st_moe_jax import cli, lory_warmup, models
  warmup = lory_warmup.lory_dense_warmup(lory_model(), 0.4, 5)
  assert warmup.steps == 2 and warmup.layer_indices == (0, 1) and warmup.num_experts == 4
  assert warmup.dense_model.moe is None and warmup.dense_model.config == lory_model().config
  assert lory_warmup.lory_dense_warmup(lory_model(), 0.0, 5) is None
  encdec = models.EncoderDecoder(lory_model().config, None, lory_model().moe)  # a Lory decoder works too
  assert lory_warmup.lory_dense_warmup(encdec, 0.4, 5).dense_model.decoder_moe is None
  sparse = lory_model(moe_type='sparse', extra_mlp=False)
  for model in (sparse, models.DecoderOnly(sparse.config, None)):
    with pytest.raises(cli.UserError, match='no Lory layers.*gin/routers/lory.gin'):
      lory_warmup.lory_dense_warmup(model, 0.05, 100)
  with pytest.raises(cli.UserError, match='EXPERT_MLP_DIM = MLP_DIM'):
    lory_warmup.lory_dense_warmup(lory_model(expert_mlp_dim=32), 0.05, 100)
  with pytest.raises(cli.UserError, match='EXTRA_MLP = False'):
    lory_warmup.lory_dense_warmup(lory_model(extra_mlp=True), 0.05, 100)
  with pytest.raises(cli.UserError, match='LORY_DENSE_WARMUP_FRACTION'):
    lory_warmup.lory_dense_warmup(lory_model(), 1.0, 100)


def test_continue_schedule_sets_only_the_schedule_count():
  import jax
  import jax.numpy as jnp
  import optax
  from st_moe_jax import optim, trainer
  params = {'w': jnp.ones((3, 2))}
  tx = optim.adafactor(optim.rsqrt_schedule(1.0, warmup_steps=4))
  state = trainer.continue_schedule(tx.init(params), 7)
  counts = [s.count for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  assert [int(c) for c in counts] == [7]
  assert int(state[0].count) == 0  # Adafactor's own statistics (and their β₂ schedule) start afresh
  assert int(trainer.schedule_count(state)) == 7


# ---------------------------------------------------------------------------------------------------------
# Training through the switch, with real orbax checkpoints.

@pytest.mark.slow
def test_switch_copies_the_dense_ffn_into_every_expert(tmp_path):
  """W = 2 dense steps, then one Lory step with learning rate 0 (from step 2 on), so checkpoint_3 holds the
  upcycled parameters as the switch made them. This also shows that the learning-rate schedule goes on from
  step 2: a schedule restarted at 0 would give 0.01 and move the parameters."""
  import jax
  import jax.numpy as jnp
  from st_moe_jax import lory_warmup
  model_dir, lines = str(tmp_path / 'run'), []
  warmup = lory_warmup.lory_dense_warmup(lory_model(), 0.4, 5)
  run_with_warmup(model_dir, 3, warmup, lambda step: jnp.where(step < 2, 0.01, 0.0), lines)
  assert sorted(d for d in os.listdir(model_dir) if d.startswith('checkpoint')) == [
      'checkpoint_2', 'checkpoint_3']
  assert any('switched to the Lory model at step 2' in line for line in lines), lines
  assert np.isfinite(losses_of(lines)[3])

  dense, upcycled = flat(params_at(model_dir, 2)), flat(params_at(model_dir, 3))
  assert not any('/expert/' in k for k in dense)  # checkpoints up to the switch hold the dense model
  for i in warmup.layer_indices:
    for name in FFN:
      experts = upcycled[f'decoder/layers_{i}/mlp/expert/{name}/kernel']
      assert experts.shape == (4,) + dense[f'decoder/layers_{i}/mlp/{name}/kernel'].shape
      for e in range(4):
        np.testing.assert_array_equal(experts[e], dense[f'decoder/layers_{i}/mlp/{name}/kernel'])
    router = upcycled[f'decoder/layers_{i}/mlp/router/router_weights/w/kernel']
    assert router.shape == (32, 4) and 0.01 < router.std() < 0.03  # Normal(0, 0.02), not zero
  for k, v in dense.items():
    if '/mlp/' not in k:
      np.testing.assert_array_equal(upcycled[k], v)

  # Right after the switch the Lory model computes what the dense model did (identical experts, merge
  # weights summing to one).
  tokens = np.array([[5, 9, 30, 41, 7, 8, 200, 3, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
                     [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 0, 0, 0, 0, 0, 0, 0]], np.int32)
  logits = lambda model, params: jax.jit(
      lambda: model.apply({'params': params}, tokens, tokens, enable_dropout=False))()
  dense_logits = logits(warmup.dense_model, params_at(model_dir, 2))
  lory_logits = logits(lory_model(), params_at(model_dir, 3))
  np.testing.assert_allclose(lory_logits, dense_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_resume_across_the_switch_matches_an_uninterrupted_run(tmp_path):
  """Stopped before the switch (dense checkpoint_1), then after it (Lory checkpoint_3): the final
  parameters equal an uninterrupted run's, and training after the switch moves the experts apart."""
  import jax
  from st_moe_jax import lory_warmup, trainer
  warmup = lory_warmup.lory_dense_warmup(lory_model(), 0.4, 5)  # W = 2
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  lines = []
  run_with_warmup(straight, 5, warmup, lines=lines)
  assert all(np.isfinite(v) for v in losses_of(lines).values()) and sorted(losses_of(lines)) == [1, 2, 3, 4, 5]

  # A run stopped at step 1, during the warm-up.
  trainer.fit(make_trainer(warmup.dense_model), resumed, make_data(),
              trainer.LoopConfig(1, BATCH, log_period=1, eval_period=1000, checkpoint_period=1),
              print_fn=lambda _: None)
  lines = []
  run_with_warmup(resumed, 3, warmup, lines=lines)  # resumes dense, switches at 2, one Lory step
  assert any('Resumed from' in line and line.endswith('checkpoint_1.') for line in lines), lines
  assert any('switched to the Lory model at step 2' in line for line in lines), lines
  lines = []
  run_with_warmup(resumed, 5, warmup, lines=lines)  # resumes the Lory model
  assert any('Resumed from' in line and line.endswith('checkpoint_3.') for line in lines), lines
  assert not any('warm-up' in line for line in lines), lines

  a, b = flat(params_at(straight, 5)), flat(params_at(resumed, 5))
  assert a.keys() == b.keys() and any('/expert/' in k for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  experts = a['decoder/layers_1/mlp/expert/wo/kernel']
  assert not np.allclose(experts[0], experts[1])  # the random router made the experts diverge
  for k in flat(params_at(resumed, 1)):
    assert '/expert/' not in k and '/router/' not in k


# ---------------------------------------------------------------------------------------------------------
# The gin run file and the entry point.

LORY_ARGS = ['--gin_file=gin/runs/pretrain.gin', '--gin_file=gin/models/st_moe_tiny.gin',
             '--gin_file=gin/runs/decoder_only.gin', '--gin_file=gin/routers/lory.gin',
             '--gin_file=gin/runs/lory_warmup.gin', '--gin.MIXTURE_OR_TASK_NAME="stdlib_lm"',
             "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", '--gin.BATCH_SIZE=8', '--gin.EMBED_DIM=32',
             '--gin.MLP_DIM=48', '--gin.NUM_HEADS=2', '--gin.HEAD_DIM=16', '--gin.NUM_EXPERTS=4',
             '--gin.SEGMENT_LENGTH=8']


def test_cli_config_errors(tmp_path, cli_error):
  common = [f'--gin.MODEL_DIR="{tmp_path}/run"', '--gin.TRAIN_STEPS=10']
  err = cli_error([*LORY_ARGS, *common, '--gin.LORY_DENSE_WARMUP_FRACTION=1.0'])
  assert 'LORY_DENSE_WARMUP_FRACTION must be a number in [0, 1)' in err
  not_lory = [a for a in LORY_ARGS if 'routers/lory.gin' not in a and 'SEGMENT' not in a]
  err = cli_error([*not_lory, *common])
  assert 'no Lory layers' in err
  err = cli_error([*LORY_ARGS, *common, '--gin.EXPERT_MLP_DIM=32'])
  assert 'EXPERT_MLP_DIM = MLP_DIM' in err
  err = cli_error([*LORY_ARGS, *common, f'--gin.INITIAL_CHECKPOINT_PATH="{tmp_path}/pretrained"'])
  assert 'does not combine with INITIAL_CHECKPOINT_PATH' in err and 'LORY_DENSE_WARMUP_FRACTION = 0' in err
  assert not os.path.exists(tmp_path / 'run')  # refused before anything was written


@pytest.mark.slow
def test_cli_trains_dense_then_lory(tmp_path):
  model_dir = str(tmp_path / 'run')
  args = [*LORY_ARGS, f'--gin.MODEL_DIR="{model_dir}"', '--gin.TRAIN_STEPS=3',
          '--gin.LORY_DENSE_WARMUP_FRACTION=0.34', '--gin.LOG_PERIOD=1', '--gin.EVAL_PERIOD=1000',
          '--gin.CHECKPOINT_PERIOD=1']
  env = {**os.environ, 'PYTHONPATH': REPO}
  result = subprocess.run([sys.executable, '-m', 'st_moe_jax.train', *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'switched to the Lory model at step 1' in result.stdout, result.stdout
  assert 'step      3/3' in result.stdout
  assert 'lory_dense_warmup_fraction = %LORY_DENSE_WARMUP_FRACTION' in open(
      os.path.join(model_dir, 'config.gin')).read()
  assert not any('/expert/' in k for k in flat(params_at(model_dir, 1)))
  assert 'decoder/layers_1/mlp/expert/wo/kernel' in flat(params_at(model_dir, 3))
